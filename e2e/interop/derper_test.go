package interop

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// derperProc is one running Tailscale derper, the reference relay.
type derperProc struct {
	name      string
	cmd       *exec.Cmd
	exited    chan struct{}
	logs      *lockedBuffer
	port      int
	stunPort  int
	cert      *testCert
	PublicKey key.NodePublic
}

// derperOptions are the derper flags the tests vary.
type derperOptions struct {
	Port, STUNPort int // fixed ports; 0 picks free ones
	Cert           *testCert
	MeshKeyFile    string
	MeshWith       []string
	CAFile         string // becomes SSL_CERT_FILE: Go's roots, used by derper's mesh client
}

func startDerper(t testing.TB, name string, opts derperOptions) *derperProc {
	t.Helper()
	dir := t.TempDir()
	if opts.Port == 0 {
		opts.Port = freePort(t, "tcp")
	}
	if opts.STUNPort == 0 {
		opts.STUNPort = freePort(t, "udp")
	}
	if opts.Cert == nil {
		opts.Cert = newTestCert(t)
	}
	opts.Cert.install(t, dir)
	cfgPath := filepath.Join(dir, "derper.json")
	args := []string{
		"-a", net.JoinHostPort("127.0.0.1", strconv.Itoa(opts.Port)),
		"-http-port=-1",
		"-stun-port", strconv.Itoa(opts.STUNPort),
		"-certmode", "manual",
		"-certdir", dir,
		"-hostname", "127.0.0.1",
		"-c", cfgPath,
		"-home", "blank",
	}
	if opts.MeshKeyFile != "" {
		args = append(args, "-mesh-psk-file", opts.MeshKeyFile)
	} else {
		args = append(args, "-mesh-psk-file", "")
	}
	if len(opts.MeshWith) > 0 {
		args = append(args, "-mesh-with", joinComma(opts.MeshWith))
	}
	d := &derperProc{name: name, logs: new(lockedBuffer), port: opts.Port, stunPort: opts.STUNPort, cert: opts.Cert, exited: make(chan struct{})}
	d.cmd = exec.Command(derperPath, args...)
	d.cmd.Env = os.Environ()
	if opts.CAFile != "" {
		d.cmd.Env = append(d.cmd.Env, "SSL_CERT_FILE="+opts.CAFile)
	}
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	fmt.Fprintf(d.logs, "==== derper %v\n", args)
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting derper: %v", err)
	}
	go func() { d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.exited
		if t.Failed() {
			t.Logf("---- stderr of derper %s ----\n%s---- end of derper %s ----", name, d.logs.String(), name)
		}
	})

	deadline := time.Now().Add(relayStartTimeout)
	for {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", d.addr(), &tls.Config{InsecureSkipVerify: true})
		if err == nil {
			conn.Close()
			break
		}
		select {
		case <-d.exited:
			t.Fatalf("derper %s exited at start:\n%s", name, d.logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("derper %s did not listen within %v", name, relayStartTimeout)
		}
	}
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct{ PrivateKey key.NodePrivate }
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("derper config %s: %v", cfgPath, err)
	}
	d.PublicKey = cfg.PrivateKey.Public()
	return d
}

func (d *derperProc) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(d.port)) }

// Node describes the derper as a node of the test DERP map.
func (d *derperProc) Node(name string) *tailcfg.DERPNode {
	return &tailcfg.DERPNode{
		Name:     name,
		RegionID: testRegionID,
		HostName: "127.0.0.1",
		IPv4:     "127.0.0.1",
		DERPPort: d.port,
		STUNPort: d.stunPort,
		CertName: d.cert.CertName,
	}
}
