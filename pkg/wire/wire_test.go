package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
)

type testMsg struct {
	Kind   string   `json:"kind"`
	Index  int      `json:"index,omitempty"`
	Pieces []string `json:"pieces"` // no omitempty: [] and null must survive a round trip
}

// frame builds a message by hand: a uvarint length then body.
func frame(n uint64, body string) []byte {
	return append(binary.AppendUvarint(nil, n), body...)
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	msgs := []testMsg{
		{Kind: "have"},
		{Kind: "request", Index: 42},
		{Kind: "pieces", Pieces: []string{strings.Repeat("x", 300), "y"}}, // multi-byte length
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		if err := WriteMsg(&buf, m); err != nil {
			t.Fatal(err)
		}
	}
	buf.WriteString("raw piece bytes")

	// A plain io.Reader that hands out one byte per Read proves that the
	// varint is read without over-reading and that short reads are handled.
	r := iotest.OneByteReader(&buf)
	for i, want := range msgs {
		var got testMsg
		if err := ReadMsg(r, &got, 1<<10); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("message %d = %+v, want %+v", i, got, want)
		}
	}
	rest, err := io.ReadAll(r)
	if err != nil || string(rest) != "raw piece bytes" {
		t.Fatalf("bytes after messages = %q, %v", rest, err)
	}
	var m testMsg
	if err := ReadMsg(r, &m, 1<<10); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadMsg at end of stream = %v, want io.EOF", err)
	}
}

func TestReadMsgErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      []byte
		max     int
		wantErr error  // nil: any error
		wantMsg string // substring of the error, if set
	}{
		{name: "too large", in: frame(11, `{"kind":"a"}`), max: 10, wantErr: ErrTooLarge},
		{name: "huge claim", in: frame(1<<62, ""), max: 1 << 20, wantErr: ErrTooLarge},
		{name: "truncated length", in: []byte{0x80}, max: 10, wantErr: io.ErrUnexpectedEOF},
		{name: "truncated body", in: frame(12, `{"kind"`), max: 100, wantErr: io.ErrUnexpectedEOF},
		{name: "length only", in: frame(5, ""), max: 100, wantErr: io.ErrUnexpectedEOF},
		{name: "varint overflow", in: bytes.Repeat([]byte{0xff}, 11), max: 100},
		{name: "empty body", in: frame(0, ""), max: 100},
		{name: "whitespace body", in: frame(2, "  "), max: 100, wantErr: io.ErrUnexpectedEOF},
		{name: "known field of wrong type beside an unknown one", in: frame(32, `{"kind":"a","new":1,"index":"x"}`), max: 100},
		{name: "wrong type", in: frame(12, `{"kind":123}`), max: 100},
		{name: "trailing value", in: frame(14, `{"kind":"a"}{}`), max: 100},
		{name: "trailing garbage", in: frame(13, `{"kind":"a"}]`), max: 100},
		{name: "not json", in: frame(5, "hello"), max: 100},
		{name: "negative cap", in: frame(2, "{}"), max: -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var m testMsg
			err := ReadMsg(bytes.NewReader(tt.in), &m, tt.max)
			if err == nil {
				t.Fatalf("ReadMsg succeeded: %+v", m)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("ReadMsg error = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("ReadMsg error = %v, want it to mention %q", err, tt.wantMsg)
			}
			// Only a clean end of stream may look like io.EOF.
			if errors.Is(err, io.EOF) {
				t.Fatalf("ReadMsg error %v wraps io.EOF", err)
			}
		})
	}
}

// TestReadMsgIgnoresUnknownFields pins forward compatibility: a message
// from a newer peer, carrying fields this version does not know, decodes
// into the fields it does know, so a rolling upgrade keeps the swarm whole.
func TestReadMsgIgnoresUnknownFields(t *testing.T) {
	t.Parallel()
	type newerMsg struct {
		testMsg
		Priority int               `json:"priority"`
		Hints    map[string][]int  `json:"hints"`
		Next     *struct{ A bool } `json:"next"`
	}
	var buf bytes.Buffer
	sent := newerMsg{testMsg: testMsg{Kind: "request", Index: 7, Pieces: []string{"a"}},
		Priority: 3, Hints: map[string][]int{"x": {1, 2}}, Next: &struct{ A bool }{true}}
	if err := WriteMsg(&buf, sent); err != nil {
		t.Fatal(err)
	}
	var got testMsg
	if err := ReadMsg(&buf, &got, 1<<10); err != nil {
		t.Fatalf("ReadMsg of a message with unknown fields: %v", err)
	}
	if !reflect.DeepEqual(got, sent.testMsg) {
		t.Fatalf("ReadMsg = %+v, want %+v", got, sent.testMsg)
	}
}

func TestReadMsgTrailingSpaceOK(t *testing.T) {
	t.Parallel()
	var m testMsg
	if err := ReadMsg(bytes.NewReader(frame(14, " {\"kind\":\"a\"}\n")), &m, 100); err != nil || m.Kind != "a" {
		t.Fatalf("ReadMsg = %+v, %v", m, err)
	}
}

// TestReadMsgBoundedAllocation is deliberately not parallel: it measures
// process-wide allocation, and sequential tests run before parallel ones.
func TestReadMsgBoundedAllocation(t *testing.T) {
	const limit = 1 << 30
	// The peer claims a body right at the cap but sends only a few bytes.
	in := frame(limit, `{"kind":`)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	var m testMsg
	err := ReadMsg(bytes.NewReader(in), &m, limit)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("ReadMsg error = %v, want io.ErrUnexpectedEOF", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
		t.Fatalf("ReadMsg allocated %d bytes for a %d-byte input", got, len(in))
	}
}

func TestWriteMsgErrors(t *testing.T) {
	t.Parallel()
	if err := WriteMsg(io.Discard, make(chan int)); err == nil {
		t.Error("WriteMsg of an unencodable value succeeded")
	}
	wantErr := errors.New("stream reset")
	if err := WriteMsg(failWriter{wantErr}, testMsg{Kind: "a"}); !errors.Is(err, wantErr) {
		t.Errorf("WriteMsg error = %v, want %v", err, wantErr)
	}
}

type failWriter struct{ err error }

func (w failWriter) Write([]byte) (int, error) { return 0, w.err }

func FuzzReadMsg(f *testing.F) {
	f.Add(frame(12, `{"kind":"a"}`))
	f.Add(frame(32, `{"kind":"p","index":3,"pieces":[]}`)[:20])
	f.Add(frame(1<<40, ""))
	f.Add([]byte{0x80, 0x80, 0x80})
	f.Add(frame(0, ""))
	f.Add(frame(9, `{"x":1}  `))
	f.Add(frame(25, `{"kind":"a","pieces":[]}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		const limit = 1 << 10
		r := bytes.NewReader(in)
		var m testMsg
		if err := ReadMsg(r, &m, limit); err != nil {
			return
		}
		consumed := len(in) - r.Len()
		if consumed > binary.MaxVarintLen64+limit {
			t.Fatalf("consumed %d bytes, cap %d", consumed, limit)
		}
		// Whatever decodes must survive a round trip unchanged.
		var buf bytes.Buffer
		if err := WriteMsg(&buf, m); err != nil {
			t.Fatalf("re-encode %+v: %v", m, err)
		}
		var again testMsg
		if err := ReadMsg(&buf, &again, 1<<20); err != nil {
			t.Fatalf("re-read %+v: %v", m, err)
		}
		if !reflect.DeepEqual(m, again) {
			t.Fatalf("round trip changed %+v into %+v", m, again)
		}
	})
}
