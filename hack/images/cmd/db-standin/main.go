// Command db-standin stands in for the database of DatabaseCluster pods on the local node:
// it listens where PostgreSQL would (5432) and answers HTTP GET /ready with 200, so a
// readiness probe sees it ready, and exits 0 at once on SIGTERM (as PID 1 a process gets no
// default signal handling, so it must ask for SIGTERM itself).
package main

import (
	"context"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	addr := ":5432"
	if a := os.Getenv("STANDIN_ADDR"); a != "" {
		addr = a
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	server := &http.Server{Addr: addr, Handler: mux}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		_ = server.Close()
	}()
	log.Printf("db-standin listening on %s", addr)
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
	log.Print("db-standin stopped")
}
