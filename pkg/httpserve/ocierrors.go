package httpserve

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/starling-oci/starling/pkg/ocierr"
)

// net/http answers some malformed requests itself, before any handler
// runs, by writing "HTTP/1.1 <status>" + errorHeaders + text straight to
// the connection (431 for oversized headers, 400 for a request it cannot
// parse, 501 for an unknown transfer encoding). ociListener's connections
// recognise that exact write and send the same status as distribution-spec
// JSON instead, so every error a registry client can get parses.
const goErrorHeaders = "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"

type ociListener struct{ net.Listener }

func (l ociListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &ociConn{Conn: c}, nil
}

type ociConn struct{ net.Conn }

func (c *ociConn) Write(b []byte) (int, error) {
	resp, ok := rewriteGoError(b)
	if !ok {
		return c.Conn.Write(b)
	}
	// The connection may carry an expired deadline from an earlier
	// response; this answer is small and the last on the connection.
	_ = c.Conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Conn.Write(resp); err != nil {
		return 0, err
	}
	return len(b), nil
}

// rewriteGoError returns the JSON form of one of net/http's own error
// responses, or false for anything else.
func rewriteGoError(b []byte) ([]byte, bool) {
	rest, ok := bytes.CutPrefix(b, []byte("HTTP/1.1 "))
	if !ok || len(rest) < 4 || (rest[0] != '4' && rest[0] != '5') {
		return nil, false
	}
	line, body, ok := bytes.Cut(rest, []byte(goErrorHeaders))
	if !ok || bytes.Contains(line, []byte("\r\n")) {
		return nil, false
	}
	status, err := strconv.Atoi(string(line[:3]))
	if err != nil {
		return nil, false
	}
	code := ocierr.Unsupported
	if status >= 500 {
		code = ocierr.Unavailable
	}
	payload, _ := json.Marshal(map[string]any{"errors": []map[string]string{{"code": code, "message": string(body)}}})
	var out bytes.Buffer
	fmt.Fprintf(&out, "HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", line, len(payload))
	out.Write(payload)
	return out.Bytes(), true
}

// NetConn returns the wrapped connection.
func (c *ociConn) NetConn() net.Conn { return c.Conn }
