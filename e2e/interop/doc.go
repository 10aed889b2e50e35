// Package interop proves that derp-relay speaks DERP the way Tailscale's own
// client code expects: every test starts real relay processes on loopback and
// drives them with packages of the tailscale.com module (derphttp, netcheck,
// prober, tsnet with testcontrol) and, for mixed meshes, Tailscale's derper.
//
// The package holds tests only; `e2e/interop/run` is the entry point.
package interop
