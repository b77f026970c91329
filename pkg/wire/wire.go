// Package wire frames the JSON messages of Starling's libp2p protocols: a
// uvarint length prefix followed by a JSON body. Readers cap the length, so a
// peer cannot make us allocate or read more than the caller allows.
package wire

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// ErrTooLarge reports a message whose length prefix exceeds the reader's cap.
var ErrTooLarge = errors.New("message too large")

// readChunk bounds the initial buffer for a body. The buffer then grows only
// as bytes actually arrive, so a peer that claims maxSize bytes and sends a few
// cannot make us allocate the whole cap.
const readChunk = 64 << 10

// WriteMsg writes v as one length-prefixed JSON message. Prefix and body go
// out in a single Write, so a message costs one stream frame, not two.
func WriteMsg(w io.Writer, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %T message: %w", v, err)
	}
	buf := make([]byte, 0, binary.MaxVarintLen64+len(body))
	buf = binary.AppendUvarint(buf, uint64(len(body)))
	buf = append(buf, body...)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write %T message (%d bytes): %w", v, len(body), err)
	}
	return nil
}

// ReadMsg reads one message written by WriteMsg into v, rejecting bodies
// longer than maxSize bytes with an error wrapping ErrTooLarge. It never
// reads past the end of the message, so the rest of r (for example a piece's
// bytes) stays unread.
//
// Fields v does not know are ignored, so a peer one version ahead can add
// optional fields without breaking older peers mid rolling upgrade; the
// fields v knows are still type-checked here and validated by the caller. A
// change of meaning, not just an added field, takes a new protocol ID.
//
// The returned error wraps io.EOF only when r ended cleanly before the first
// byte of a message; a message cut short wraps io.ErrUnexpectedEOF.
func ReadMsg(r io.Reader, v any, maxSize int) error {
	if maxSize < 0 {
		return fmt.Errorf("read message: negative size cap %d", maxSize)
	}
	br, ok := r.(io.ByteReader)
	if !ok {
		br = byteReader{r}
	}
	n, err := binary.ReadUvarint(br)
	if err != nil {
		return fmt.Errorf("read message length: %w", err)
	}
	if n > uint64(maxSize) {
		return fmt.Errorf("read message: length %d exceeds cap %d: %w", n, maxSize, ErrTooLarge)
	}
	if n == 0 {
		// Caught here so that decoding "" cannot surface as a clean io.EOF.
		return errors.New("read message: empty body")
	}

	var body bytes.Buffer
	body.Grow(int(min(n, readChunk)))
	if got, err := io.CopyN(&body, r, int64(n)); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("read message body: got %d of %d bytes: %w", got, n, err)
	}

	dec := json.NewDecoder(&body)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) { // whitespace-only body
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("decode %T message: %w", v, err)
	}
	if !onlySpace(dec, &body) {
		return fmt.Errorf("decode %T message: trailing data after JSON value", v)
	}
	return nil
}

// onlySpace reports whether nothing but JSON whitespace follows the value the
// decoder has just read.
func onlySpace(dec *json.Decoder, rest *bytes.Buffer) bool {
	tail, _ := io.ReadAll(io.MultiReader(dec.Buffered(), rest)) // in-memory readers cannot fail
	return len(bytes.TrimLeft(tail, " \t\r\n")) == 0
}

// byteReader reads one byte at a time from r so the varint prefix can be
// parsed without buffering, and thus without consuming bytes past it.
type byteReader struct{ r io.Reader }

func (b byteReader) ReadByte() (byte, error) {
	var buf [1]byte
	if _, err := io.ReadFull(b.r, buf[:]); err != nil {
		return 0, err
	}
	return buf[0], nil
}
