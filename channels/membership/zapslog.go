package membership

import (
	"context"
	"log/slog"
	"slices"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// newZapToSlog returns a zap logger that writes to log, so that the etcd
// client's messages (which it logs with zap) reach the proxy's log with the
// same format and level filter.
func newZapToSlog(log *slog.Logger) *zap.Logger {
	return zap.New(zapSlogCore{h: log.Handler()})
}

type zapSlogCore struct {
	h     slog.Handler
	attrs []slog.Attr
}

func zapToSlogLevel(l zapcore.Level) slog.Level {
	switch {
	case l <= zapcore.DebugLevel:
		// The client logs every request at debug ("retrying of unary
		// invoker", attempt 0): below the proxy's own debug messages.
		return slog.LevelDebug - 4
	case l == zapcore.InfoLevel:
		return slog.LevelInfo
	case l == zapcore.WarnLevel:
		return slog.LevelWarn
	default:
		return slog.LevelError
	}
}

func (c zapSlogCore) Enabled(l zapcore.Level) bool {
	return c.h.Enabled(context.Background(), zapToSlogLevel(l))
}

func (c zapSlogCore) With(fields []zapcore.Field) zapcore.Core {
	c.attrs = append(slices.Clip(c.attrs), zapFieldsToAttrs(fields)...)
	return c
}

func (c zapSlogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c zapSlogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	r := slog.NewRecord(e.Time, zapToSlogLevel(e.Level), e.Message, 0)
	r.AddAttrs(c.attrs...)
	r.AddAttrs(zapFieldsToAttrs(fields)...)
	return c.h.Handle(context.Background(), r)
}

func (zapSlogCore) Sync() error { return nil }

// zapFieldsToAttrs converts zap fields with zap's own encoder, keeping
// their order.
func zapFieldsToAttrs(fields []zapcore.Field) []slog.Attr {
	attrs := make([]slog.Attr, 0, len(fields))
	for _, f := range fields {
		enc := zapcore.NewMapObjectEncoder()
		f.AddTo(enc)
		for k, v := range enc.Fields {
			attrs = append(attrs, slog.Any(k, v))
		}
	}
	return attrs
}
