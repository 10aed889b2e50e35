//go:build ts_debug_websockets

package interop

// builtWithWebsockets: derphttp's WebSocket dialer is compiled in only with
// the ts_debug_websockets build tag (derp/derphttp/websocket.go).
const builtWithWebsockets = true
