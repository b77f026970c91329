package swarmproto

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/starling-oci/starling/pkg/wire"
)

// TestDecodeRequestFromNewerAgent: an agent one version ahead adds a field;
// this supernode still reads and validates the request, instead of refusing
// it and sending the agent back to the registry mid rolling upgrade. The
// fields it knows are still checked.
func TestDecodeRequestFromNewerAgent(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		body    string
		wantErr bool
	}{
		{body: `{"op":"poll","digest":"` + digest + `","registry":"127.0.0.1:5000","repo":"library/alpine","want":-1,"priority_class":"high","hints":{"zone":"b"}}`},
		{body: `{"op":"poll","digest":"sha256:nope","registry":"127.0.0.1:5000","repo":"library/alpine","want":-1,"priority_class":"high"}`, wantErr: true},
	} {
		frame := append(binary.AppendUvarint(nil, uint64(len(tt.body))), tt.body...)
		var req TrackerRequest
		err := wire.ReadMsg(bytes.NewReader(frame), &req, MaxRequestBytes)
		if err == nil {
			err = req.Validate()
		}
		if (err != nil) != tt.wantErr {
			t.Errorf("decode+validate %s: err = %v, want error %v", tt.body, err, tt.wantErr)
		}
	}
}
