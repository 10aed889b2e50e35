package interop

import (
	_ "tailscale.com/derp/derphttp"
	_ "tailscale.com/net/netcheck"
	_ "tailscale.com/prober"
	_ "tailscale.com/tsnet"
	_ "tailscale.com/tstest/integration/testcontrol"
)
