package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/starling-oci/starling/pkg/ocierr"
)

// Cause names why an upstream request failed, as a short class an operator
// can act on: no URL, path or address, so it may go into a client's error
// message. The full error goes to the log.
func Cause(err error) string {
	var (
		oe      *ocierr.Error
		dnsErr  *net.DNSError
		certErr *tls.CertificateVerificationError
		unknown x509.UnknownAuthorityError
		invalid x509.CertificateInvalidError
		host    x509.HostnameError
		recErr  tls.RecordHeaderError
		netErr  net.Error
	)
	var ce causeError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &ce):
		return ce.cause
	case errors.As(err, &oe):
		return fmt.Sprintf("HTTP %d", oe.Status)
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return "server gave HTTP response to HTTPS client"
	case errors.As(err, &certErr), errors.As(err, &unknown), errors.As(err, &invalid), errors.As(err, &host):
		return "TLS certificate not trusted"
	case errors.As(err, &recErr), strings.Contains(err.Error(), "tls: "):
		return "TLS handshake failed"
	case errors.As(err, &dnsErr):
		return "DNS lookup failed"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "connection reset"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return "timed out"
	}
	return "connection failed"
}

// causeError is a transport error, redacted, with its cause class: the
// original error chain is not kept, since its text may carry signed URLs.
type causeError struct{ cause, msg string }

func (e causeError) Error() string { return e.msg }

// hint says what to change when a cause points at a misconfiguration.
func hint(reg Registry, cause string) string {
	switch cause {
	case "server gave HTTP response to HTTPS client":
		return fmt.Sprintf("the registry speaks plain HTTP: configure it as --registry http://%s", reg.Endpoint.Host)
	case "TLS certificate not trusted":
		return "trust its CA with --ca-file (a PEM bundle)"
	}
	return ""
}

// Finding is what a start-up check of one registry found.
type Finding struct {
	Registry  string
	Endpoint  string
	Reachable bool
	// TLS: the registry answered over HTTPS.
	TLS bool
	// Status is the answer to GET /v2/ (0 when there was none).
	Status int
	// AuthRequired: /v2/ asked for credentials (normal for Docker Hub,
	// Harbor and any registry with auth); Realm is its token service, if any.
	AuthRequired bool
	Realm        string
	Cause        string
	Hint         string
	Elapsed      time.Duration
}

// Check asks a registry for GET /v2/ once, without credentials, and says
// what it found: reachable or not (and why), TLS or plain, auth required.
func (c *Client) Check(ctx context.Context, reg Registry) Finding {
	f := Finding{Registry: reg.Host, Endpoint: reg.Endpoint.String(), TLS: reg.Endpoint.Scheme == "https"}
	u := *reg.Endpoint
	u.Path = "/v2/"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		f.Cause = err.Error()
		return f
	}
	req.Header.Set("User-Agent", c.userAgent)
	start := time.Now()
	resp, err := (&http.Client{Transport: c.base}).Do(req)
	f.Elapsed = time.Since(start)
	if err != nil {
		f.TLS = false
		f.Cause = Cause(err)
		f.Hint = hint(reg, f.Cause)
		return f
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	f.Reachable, f.Status = true, resp.StatusCode
	switch {
	case resp.StatusCode == http.StatusUnauthorized:
		f.AuthRequired = true
		f.Realm = realm(resp.Header.Get("WWW-Authenticate"))
	case resp.StatusCode == http.StatusBadRequest && strings.Contains(string(body), "HTTP request to an HTTPS server"):
		f.Cause = "client sent an HTTP request to an HTTPS server"
		f.Hint = fmt.Sprintf("the registry speaks HTTPS: configure it as --registry https://%s", reg.Endpoint.Host)
	case resp.StatusCode >= 300:
		f.Cause = fmt.Sprintf("GET /v2/ answered HTTP %d: not a registry API endpoint?", resp.StatusCode)
	}
	return f
}

// realm extracts the realm of a WWW-Authenticate challenge.
func realm(challenge string) string {
	_, after, ok := strings.Cut(challenge, `realm="`)
	if !ok {
		return ""
	}
	r, _, _ := strings.Cut(after, `"`)
	return r
}

// LogFinding writes one line for a start-up check: info when the registry
// answered as a registry should, warn otherwise.
func LogFinding(log *zap.Logger, f Finding) {
	fields := []zap.Field{zap.String("registry", f.Registry), zap.String("endpoint", f.Endpoint),
		zap.Bool("reachable", f.Reachable), zap.Bool("tls", f.TLS), zap.Duration("elapsed", f.Elapsed)}
	if f.Status != 0 {
		fields = append(fields, zap.Int("status", f.Status), zap.Bool("auth_required", f.AuthRequired))
	}
	if f.Realm != "" {
		fields = append(fields, zap.String("token_realm", f.Realm))
	}
	if f.Cause != "" {
		fields = append(fields, zap.String("cause", f.Cause))
	}
	if f.Hint != "" {
		fields = append(fields, zap.String("hint", f.Hint))
	}
	if f.Reachable && f.Cause == "" {
		log.Info("upstream registry check: ok", fields...)
		return
	}
	log.Warn("upstream registry check: FAILED, pulls through Starling will fail and clients may bypass it", fields...)
}
