package interop

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// relayBinary is the relay under test; the Makefile puts it on PATH.
const relayBinary = "derp-relay"

// relayStartTimeout bounds how long a relay may take to write its status file.
const relayStartTimeout = 30 * time.Second

// relayStopTimeout bounds how long a relay may take to exit after SIGTERM.
const relayStopTimeout = 15 * time.Second

// relayStatus is the JSON the relay writes to --status-file once it listens.
type relayStatus struct {
	URL       string `json:"url"`
	Host      string `json:"host"`
	DERPPort  int    `json:"derpPort"`
	STUNPort  int    `json:"stunPort"`
	PublicKey string `json:"publicKey"`
	CertName  string `json:"certName"`
	TLS       bool   `json:"tls"`
}

// relayOptions are the flags one relay process is started with.
type relayOptions struct {
	// Addr is the -a listen address; "" means 127.0.0.1 with an ephemeral port.
	Addr string
	// STUNPort is the UDP port; 0 means ephemeral, -1 means --no-stun.
	STUNPort int
	// PlainHTTP serves DERP without TLS (--certmode none).
	PlainHTTP bool
	// MeshKeyFile and MeshWith configure meshing (derper's flags of the same names).
	MeshKeyFile string
	MeshWith    []string
	// VerifyClientURL points at an admission server; FailOpen is its fail-open flag.
	VerifyClientURL string
	FailOpen        bool
	// Cert, if set, is installed in the certdir and served with --certmode manual.
	Cert *testCert
	// CertReloadInterval is --cert-reload-interval (seconds); "" leaves the default.
	CertReloadInterval string
	// MeshCAFile verifies mesh peers' certificates (--mesh-ca-file).
	MeshCAFile string
	// Workers is --workers; 0 leaves the relay's default (one per usable CPU).
	Workers int
	// Env is added to the process environment.
	Env []string
}

// relayProc is one running derp-relay process.
type relayProc struct {
	t      testing.TB
	name   string
	opts   relayOptions
	dir    string // certdir, key file and status file survive restarts
	Status relayStatus

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // from cmd.Wait, valid once exited is closed
	logs   *lockedBuffer
}

// lockedBuffer collects a child's stderr while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if os.Getenv("INTEROP_STREAM_LOGS") != "" {
		os.Stderr.Write(p)
	}
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startRelay starts derp-relay, waits for its status file and stops it when
// the test ends; on failure the relay's stderr is printed.
func startRelay(t testing.TB, name string, opts relayOptions) *relayProc {
	t.Helper()
	if _, err := exec.LookPath(relayBinary); err != nil {
		t.Fatalf("%s is not on PATH (run e2e/interop/run via `make interop`): %v", relayBinary, err)
	}
	r := &relayProc{t: t, name: name, opts: opts, dir: t.TempDir(), logs: new(lockedBuffer)}
	t.Cleanup(func() {
		r.kill()
		if t.Failed() {
			t.Logf("---- stderr of relay %s ----\n%s---- end of relay %s ----", name, r.logs.String(), name)
		}
	})
	r.start()
	return r
}

func (r *relayProc) statusPath() string { return filepath.Join(r.dir, "status.json") }

func (r *relayProc) args() []string {
	addr := r.opts.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	args := []string{
		"-a", addr,
		"--hostname", "127.0.0.1",
		"--certdir", filepath.Join(r.dir, "certs"),
		"-c", filepath.Join(r.dir, "relay-key.json"),
		"--status-file", r.statusPath(),
	}
	switch {
	case r.opts.PlainHTTP:
		args = append(args, "--certmode", "none")
	case r.opts.Cert != nil:
		args = append(args, "--certmode", "manual")
	default:
		args = append(args, "--certmode", "selfsigned")
	}
	if r.opts.STUNPort < 0 {
		args = append(args, "--no-stun")
	} else {
		args = append(args, "--stun-port", strconv.Itoa(r.opts.STUNPort))
	}
	if r.opts.MeshKeyFile != "" {
		args = append(args, "--mesh-psk-file", r.opts.MeshKeyFile)
	}
	if r.opts.MeshCAFile != "" {
		args = append(args, "--mesh-ca-file", r.opts.MeshCAFile)
	}
	if len(r.opts.MeshWith) > 0 {
		args = append(args, "--mesh-with", joinComma(r.opts.MeshWith))
	}
	if r.opts.Workers > 0 {
		args = append(args, "--workers", strconv.Itoa(r.opts.Workers))
	}
	if r.opts.CertReloadInterval != "" {
		args = append(args, "--cert-reload-interval", r.opts.CertReloadInterval)
	}
	if r.opts.VerifyClientURL != "" {
		args = append(args, "--verify-client-url", r.opts.VerifyClientURL,
			"--verify-client-url-fail-open="+strconv.FormatBool(r.opts.FailOpen))
	}
	return args
}

func joinComma(s []string) string {
	var b bytes.Buffer
	for i, v := range s {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(v)
	}
	return b.String()
}

func (r *relayProc) start() {
	r.t.Helper()
	os.Remove(r.statusPath())
	if r.opts.Cert != nil {
		r.opts.Cert.install(r.t, filepath.Join(r.dir, "certs"))
	}
	cmd := exec.Command(relayBinary, r.args()...)
	cmd.Env = append(os.Environ(), r.opts.Env...)
	cmd.Stdout = r.logs
	cmd.Stderr = r.logs
	fmt.Fprintf(r.logs, "==== %s %v\n", relayBinary, cmd.Args[1:])
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("starting relay %s: %v", r.name, err)
	}
	exited := make(chan struct{})
	r.mu.Lock()
	r.cmd, r.exited = cmd, exited
	r.mu.Unlock()
	go func() {
		err := cmd.Wait()
		r.mu.Lock()
		r.err = err
		r.mu.Unlock()
		close(exited)
	}()

	deadline := time.Now().Add(relayStartTimeout)
	for {
		b, err := os.ReadFile(r.statusPath())
		if err == nil {
			var st relayStatus
			if err := json.Unmarshal(b, &st); err != nil {
				r.t.Fatalf("relay %s: status file is not JSON: %v\n%s", r.name, err, b)
			}
			r.Status = st
			r.checkStatus()
			return
		}
		select {
		case <-exited:
			r.t.Fatalf("relay %s exited before writing its status file: %v", r.name, r.err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("relay %s wrote no status file within %v", r.name, relayStartTimeout)
		}
	}
}

// checkStatus validates the status file against the flags we gave.
func (r *relayProc) checkStatus() {
	r.t.Helper()
	st := r.Status
	if st.DERPPort == 0 || st.Host == "" || st.URL == "" {
		r.t.Fatalf("relay %s: incomplete status %+v", r.name, st)
	}
	if _, err := r.PublicKey(); err != nil {
		r.t.Fatalf("relay %s: status publicKey %q: %v", r.name, st.PublicKey, err)
	}
	if st.TLS == r.opts.PlainHTTP {
		r.t.Fatalf("relay %s: status tls=%v but plain HTTP=%v", r.name, st.TLS, r.opts.PlainHTTP)
	}
	if st.TLS && st.CertName == "" {
		r.t.Fatalf("relay %s: TLS relay reports no certName", r.name)
	}
	if c := r.opts.Cert; c != nil && st.CertName != c.CertName {
		r.t.Fatalf("relay %s: status certName %s, but it was given the certificate %s", r.name, st.CertName, c.CertName)
	}
	if r.opts.STUNPort >= 0 && st.STUNPort == 0 {
		r.t.Fatalf("relay %s: STUN enabled but status has no stunPort", r.name)
	}
}

// PublicKey is the relay's DERP server key from its status file.
func (r *relayProc) PublicKey() (key.NodePublic, error) {
	var k key.NodePublic
	err := k.UnmarshalText([]byte(r.Status.PublicKey))
	return k, err
}

// DERPAddr is host:port of the relay's DERP (HTTP/TLS) listener.
func (r *relayProc) DERPAddr() string {
	return net.JoinHostPort(r.Status.Host, strconv.Itoa(r.Status.DERPPort))
}

// Node describes this relay as a node of the test DERP map.
func (r *relayProc) Node(name string) *tailcfg.DERPNode {
	n := &tailcfg.DERPNode{
		Name:     name,
		RegionID: testRegionID,
		HostName: r.Status.Host,
		IPv4:     r.Status.Host, // dial this address; HostName is only the TLS name
		DERPPort: r.Status.DERPPort,
		STUNPort: r.Status.STUNPort,
		CertName: r.Status.CertName,
	}
	if r.opts.STUNPort < 0 {
		n.STUNPort = -1
	}
	return n
}

// Signal sends sig to the relay.
func (r *relayProc) Signal(sig os.Signal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil && r.cmd.Process != nil {
		r.cmd.Process.Signal(sig)
	}
}

// Stop sends SIGTERM and waits for the process to exit; it returns the
// process's exit error (nil for exit status 0).
func (r *relayProc) Stop() error {
	r.Signal(syscall.SIGTERM)
	return r.wait(relayStopTimeout)
}

func (r *relayProc) wait(d time.Duration) error {
	r.mu.Lock()
	exited := r.exited
	r.mu.Unlock()
	if exited == nil {
		return errors.New("not started")
	}
	select {
	case <-exited:
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.err
	case <-time.After(d):
		r.kill()
		return fmt.Errorf("relay %s did not exit within %v of SIGTERM", r.name, d)
	}
}

// Restart stops the relay and starts it again on the same ports, with the
// same key and certificate.
func (r *relayProc) Restart() {
	r.t.Helper()
	if err := r.Stop(); err != nil {
		r.t.Fatalf("stopping relay %s: %v", r.name, err)
	}
	prev := r.Status
	r.opts.Addr = r.DERPAddr()
	if r.opts.STUNPort == 0 {
		r.opts.STUNPort = prev.STUNPort
	}
	r.start()
	if r.Status.PublicKey != prev.PublicKey || r.Status.CertName != prev.CertName {
		r.t.Fatalf("relay %s changed identity across restart: %+v -> %+v", r.name, prev, r.Status)
	}
}

func (r *relayProc) kill() {
	r.mu.Lock()
	cmd, exited := r.cmd, r.exited
	r.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	select {
	case <-exited:
		return
	default:
	}
	cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
	}
}

// Logs returns everything the relay wrote so far.
func (r *relayProc) Logs() string { return r.logs.String() }

// freePort returns a loopback port that was free a moment ago, for relays
// that must know each other's addresses before they start (meshes).
func freePort(t testing.TB, network string) int {
	t.Helper()
	switch network {
	case "tcp":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).Port
	case "udp":
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		return pc.LocalAddr().(*net.UDPAddr).Port
	}
	t.Fatalf("freePort: bad network %q", network)
	return 0
}

// writeMeshKey writes a fresh 64-hex-digit mesh key file and returns its path
// and the parsed key.
func writeMeshKey(t testing.TB) (string, key.DERPMesh) {
	t.Helper()
	var raw [32]byte
	if _, err := crand.Read(raw[:]); err != nil {
		t.Fatal(err)
	}
	text := hex.EncodeToString(raw[:])
	k, err := key.ParseDERPMesh(text)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "mesh.key")
	if err := os.WriteFile(path, []byte(text+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, k
}

// testContext is a context bounded by d and by the test's own deadline.
func testContext(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
