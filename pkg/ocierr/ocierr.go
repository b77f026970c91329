// Package ocierr is the distribution-spec error: a status code plus the
// JSON body {"errors":[{"code":...,"message":...}]} that registry clients parse.
package ocierr

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
)

// Codes from the OCI distribution spec (and distribution's UNAVAILABLE).
const (
	BlobUnknown     = "BLOB_UNKNOWN"
	DigestInvalid   = "DIGEST_INVALID"
	ManifestUnknown = "MANIFEST_UNKNOWN"
	ManifestInvalid = "MANIFEST_INVALID"
	NameInvalid     = "NAME_INVALID"
	NameUnknown     = "NAME_UNKNOWN"
	Unauthorized    = "UNAUTHORIZED"
	Denied          = "DENIED"
	Unsupported     = "UNSUPPORTED"
	TooManyRequests = "TOOMANYREQUESTS"
	Unavailable     = "UNAVAILABLE"
	Unknown         = "UNKNOWN"
	RangeInvalid    = "RANGE_INVALID"
)

// Error is an error a registry client can understand.
type Error struct {
	Status  int
	Code    string
	Message string
	// Challenge is an upstream WWW-Authenticate value relayed to the client
	// so that its own token flow can run.
	Challenge string
	// RetryAfter is relayed on 429 and 503.
	RetryAfter string
	// Body, when set, is the upstream's own error JSON, relayed verbatim.
	Body []byte
	// Cause is what went wrong inside (a dial error, a path): it goes to
	// the log through Error, never to the client.
	Cause error
}

func (e *Error) Error() string {
	if e.Cause != nil {
		return fmt.Sprintf("%s (%d): %s: %v", e.Code, e.Status, e.Message, e.Cause)
	}
	return fmt.Sprintf("%s (%d): %s", e.Code, e.Status, e.Message)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Cause }

// New builds an Error.
func New(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

type item struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

type body struct {
	Errors []item `json:"errors"`
}

// Write sends err as an OCI error response. Errors that are not *Error
// become 500 UNKNOWN without leaking their text (it may name internal paths).
func Write(w http.ResponseWriter, r *http.Request, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = New(http.StatusInternalServerError, Unknown, "internal error")
	}
	payload := e.Body
	if len(payload) == 0 || !json.Valid(payload) {
		payload, _ = json.Marshal(body{Errors: []item{{Code: e.Code, Message: e.Message}}})
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(payload)))
	if e.Challenge != "" {
		h.Set("WWW-Authenticate", e.Challenge)
	}
	if e.RetryAfter != "" {
		h.Set("Retry-After", e.RetryAfter)
	}
	w.WriteHeader(e.Status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(payload)
	}
}

// FromResponse turns a non-2xx upstream response into an Error, keeping the
// status, the challenge and, when it is small valid JSON, the upstream body.
// The caller still owns resp.Body.
func FromResponse(resp *http.Response, payload []byte) *Error {
	e := &Error{
		Status:     resp.StatusCode,
		Code:       codeFor(resp.StatusCode),
		Message:    fmt.Sprintf("upstream answered %s", resp.Status),
		Challenge:  resp.Header.Get("WWW-Authenticate"),
		RetryAfter: resp.Header.Get("Retry-After"),
	}
	var b body
	if json.Unmarshal(payload, &b) == nil && len(b.Errors) > 0 {
		e.Body = payload
		e.Code = b.Errors[0].Code
		if b.Errors[0].Message != "" {
			e.Message = b.Errors[0].Message
		}
	}
	return e
}

func codeFor(status int) string {
	switch status {
	case http.StatusUnauthorized:
		return Unauthorized
	case http.StatusForbidden:
		return Denied
	case http.StatusNotFound:
		return NameUnknown
	case http.StatusTooManyRequests:
		return TooManyRequests
	case http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
		return Unavailable
	}
	return Unknown
}

// IsStatus reports whether err is an *Error with the given status.
func IsStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == status
}
