package interop

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"tailscale.com/net/netcheck"
	"tailscale.com/net/netmon"
)

// TestNetcheck: Tailscale's netcheck finds our region over STUN, measures its
// latency and learns the mapped address from our STUN answer; with UDP off
// (OnlyTCP443) it measures the region over our DERP port instead.
func TestNetcheck(t *testing.T) {
	relay := startRelay(t, "r1", relayOptions{})
	dm := derpMapOf(relay.Node("900a"))

	t.Run("stun", func(t *testing.T) {
		ctx := testContext(t, 30*time.Second)
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		local := pc.LocalAddr().(*net.UDPAddr).AddrPort()

		c := &netcheck.Client{NetMon: netmon.NewStatic(), Logf: t.Logf, Verbose: true}
		c.SendPacket = func(b []byte, dst netip.AddrPort) (int, error) { return pc.WriteToUDPAddrPort(b, dst) }
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, src, err := pc.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				c.ReceiveSTUNPacket(buf[:n], src)
			}
		}()
		before := relay.metric(t, `stun_requests_total{disposition="success"}`)
		r, err := c.GetReport(ctx, dm, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !r.UDP {
			t.Errorf("report.UDP = false: no STUN answer reached netcheck")
		}
		if d, ok := r.RegionLatency[testRegionID]; !ok || d <= 0 {
			t.Errorf("RegionLatency = %v, want a positive latency for region %d", r.RegionLatency, testRegionID)
		}
		if r.PreferredDERP != testRegionID {
			t.Errorf("PreferredDERP = %d, want %d", r.PreferredDERP, testRegionID)
		}
		if r.GlobalV4 != netip.AddrPortFrom(local.Addr().Unmap(), local.Port()) {
			t.Errorf("GlobalV4 (our STUN's mapped address) = %v, want the probing socket %v", r.GlobalV4, local)
		}
		if after := relay.metric(t, `stun_requests_total{disposition="success"}`); after <= before {
			t.Errorf("stun_requests_total{disposition=success} %v -> %v: the answers did not come from our relay", before, after)
		}
	})

	t.Run("https", func(t *testing.T) {
		ctx := testContext(t, 30*time.Second)
		c := &netcheck.Client{NetMon: netmon.NewStatic(), Logf: t.Logf, Verbose: true}
		r, err := c.GetReport(ctx, dm, &netcheck.GetReportOpts{OnlyTCP443: true})
		if err != nil {
			t.Fatal(err)
		}
		if d, ok := r.RegionLatency[testRegionID]; !ok || d <= 0 {
			t.Errorf("RegionLatency over HTTPS = %v, want a positive latency for region %d", r.RegionLatency, testRegionID)
		}
		if r.PreferredDERP != testRegionID {
			t.Errorf("PreferredDERP = %d, want %d", r.PreferredDERP, testRegionID)
		}
	})
}
