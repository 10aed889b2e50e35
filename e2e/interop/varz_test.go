package interop

import (
	"crypto/tls"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// derperOnlyMetrics are derper's /debug/varz metrics that derp-relay does not
// serve, with the reason. The README's Diagnostics section lists the same
// names (the test checks it), so nobody has to run both relays to find out.
var derperOnlyMetrics = map[string]string{
	"derp_buffered_write_frames":               "histogram of frames per bufio flush in derper's send loop; ours writes one batch per event-loop turn",
	"derp_mesh_update_batch_size":              "derper batches PeerPresent/PeerGone for watchers in a loop; ours sends each as it happens",
	"derp_mesh_update_loop_count":              "as derp_mesh_update_batch_size: no update loop to measure",
	"derp_memstats_sys0":                       "Go memory at start; see process_resident_memory_bytes",
	"bootstrap_dns_published_hits":             "derper answers per-name ?q= queries from a published list; ours serves the configured names only",
	"bootstrap_dns_published_misses":           "as bootstrap_dns_published_hits",
	"bootstrap_dns_unpublished_hits":           "as bootstrap_dns_published_hits",
	"bootstrap_dns_unpublished_misses":         "as bootstrap_dns_published_hits",
	"bootstrap_dns_unpublished_percent_misses": "as bootstrap_dns_published_hits",
	"bootstrap_dns_queried_domains":            "as bootstrap_dns_published_hits",
	"node_boot_time_seconds":                   "the host's boot time: node-exporter's figure, not the relay's",
	"goroutines":                               "Go runtime; /debug/pprof/goroutine lists our asyncio tasks instead",
	"go_sync_mutex_wait_seconds":               "Go runtime: one event loop, no mutexes",
	"go_version":                               "Go runtime; python_info names the Python",
}

// derperOnlyPrefixes are whole families of derper's names that are Go's own.
var derperOnlyPrefixes = map[string]string{
	"go_":       "the Go runtime (GC, heap, threads); ours has python_gc_* and python_info, and process_*",
	"memstats_": "Go's memory statistics; see process_resident_memory_bytes and /debug/pprof/heap",
}

// varzFamily is one metric of a /debug/varz page.
type varzFamily struct {
	Type   string          // "" when the page declares none (derper's expvar functions)
	Labels map[string]bool // label names seen on its samples
}

var sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? `)
var labelNameRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`)

// parseVarzFamilies reads Prometheus text into families by name; a
// histogram's _bucket/_sum/_count samples belong to it.
func parseVarzFamilies(text string) map[string]*varzFamily {
	families := map[string]*varzFamily{}
	family := func(name string) *varzFamily {
		if f, ok := families[name]; ok {
			return f
		}
		f := &varzFamily{Labels: map[string]bool{}}
		families[name] = f
		return f
	}
	for _, line := range strings.Split(text, "\n") {
		if fields := strings.Fields(line); len(fields) == 4 && fields[0] == "#" && fields[1] == "TYPE" {
			family(fields[2]).Type = fields[3]
		}
	}
	for _, line := range strings.Split(text, "\n") {
		m := sampleRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		name := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok {
				if f, ok := families[base]; ok && (f.Type == "histogram" || f.Type == "summary") {
					name = base
				}
			}
		}
		f := family(name)
		for _, l := range labelNameRE.FindAllStringSubmatch(m[2], -1) {
			if l[1] != "le" && l[1] != "quantile" {
				f.Labels[l[1]] = true
			}
		}
	}
	return families
}

func derperOnlyReason(name string) (string, bool) {
	if why, ok := derperOnlyMetrics[name]; ok {
		return why, true
	}
	for prefix, why := range derperOnlyPrefixes {
		if strings.HasPrefix(name, prefix) {
			return why, true
		}
	}
	return "", false
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// TestVarzNamesMatchDerper: a live derper's /debug/varz and ours, side by
// side. Every derper metric is either served by derp-relay under the same
// name, type and label names, or listed in derperOnlyMetrics with a reason
// (and in the README); the list holds no name we do serve.
func TestVarzNamesMatchDerper(t *testing.T) {
	derper := startDerper(t, "derper", derperOptions{})
	relay := startRelay(t, "relay", relayOptions{})
	ctx := testContext(t, 30*time.Second)

	theirsText, err := getText(ctx, "https://"+derper.addr()+"/debug/varz", &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("derper /debug/varz: %v", err)
	}
	oursText, err := relay.get(ctx, "/debug/varz")
	if err != nil {
		t.Fatalf("derp-relay /debug/varz: %v", err)
	}
	theirs, ours := parseVarzFamilies(theirsText), parseVarzFamilies(oursText)

	var common, leftOut []string
	for _, name := range sortedKeys(theirs) {
		want := theirs[name]
		got, ok := ours[name]
		if !ok {
			if _, listed := derperOnlyReason(name); !listed {
				t.Errorf("derper's %s (type %q, labels %v) is neither served by derp-relay nor listed in derperOnlyMetrics", name, want.Type, sortedKeys(want.Labels))
			}
			leftOut = append(leftOut, name)
			continue
		}
		common = append(common, name)
		if want.Type != "" && got.Type != want.Type {
			t.Errorf("%s: derper's type is %s, ours %s", name, want.Type, got.Type)
		}
		if len(want.Labels) > 0 && strings.Join(sortedKeys(got.Labels), ",") != strings.Join(sortedKeys(want.Labels), ",") {
			t.Errorf("%s: derper's labels are %v, ours %v", name, sortedKeys(want.Labels), sortedKeys(got.Labels))
		}
	}
	var extra []string
	for _, name := range sortedKeys(ours) {
		if _, ok := theirs[name]; !ok {
			extra = append(extra, name)
		}
	}

	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for name := range derperOnlyMetrics {
		if _, ok := ours[name]; ok {
			t.Errorf("derperOnlyMetrics lists %s, but derp-relay serves it: drop it from the list and the README", name)
		}
		if _, ok := theirs[name]; !ok {
			t.Errorf("derperOnlyMetrics lists %s, which derper does not serve (any more)", name)
		}
		if !strings.Contains(string(readme), "`"+name+"`") {
			t.Errorf("README.md does not list the left-out metric `%s`", name)
		}
	}
	for prefix := range derperOnlyPrefixes {
		if !strings.Contains(string(readme), "`"+prefix+"*`") {
			t.Errorf("README.md does not list the left-out metrics `%s*`", prefix)
		}
	}
	t.Logf("metric names: derper %d, derp-relay %d, in common %d, derper's left out %d, ours only %d",
		len(theirs), len(ours), len(common), len(leftOut), len(extra))
	t.Logf("left out: %s", strings.Join(leftOut, " "))
	t.Logf("ours only: %s", strings.Join(extra, " "))
}
