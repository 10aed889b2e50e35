// Command echoserver is the test node's workload: an HTTP server that tells a
// client what the pod saw of it (its address), who it runs as, and the content
// of a file (a mounted volume), so a test outside the pod can check the
// hostPort path, the securityContext and the kubelet's volumes from one reply.
package main

import (
	"encoding/json"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

type reply struct {
	RemoteAddr string `json:"remoteAddr"`
	UID        int    `json:"uid"`
	Hostname   string `json:"hostname"`
	File       string `json:"file"`
	FileError  string `json:"fileError,omitempty"`
}

func main() {
	listen := flag.String("listen", ":8080", "address to serve on")
	file := flag.String("file", "", "a file whose content each reply carries")
	flag.Parse()

	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		out := reply{RemoteAddr: r.RemoteAddr, UID: os.Getuid()}
		out.Hostname, _ = os.Hostname()
		if *file != "" {
			if content, err := os.ReadFile(*file); err != nil {
				out.FileError = err.Error()
			} else {
				out.File = string(content)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("serving on %s", listener.Addr())
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		sig := <-signals
		log.Printf("got %s", sig)
		os.Exit(0)
	}()
	log.Fatal(http.Serve(listener, nil))
}
