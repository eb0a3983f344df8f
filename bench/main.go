// Command bench measures outbox-relay against the physical ceilings of the machine it runs on.
//
// It starts a throwaway Postgres cluster (internal/testenv) and a nats-server with JetStream
// (file storage), builds the relay and runs it as a child process (to read its CPU time and
// peak RSS), and prints one table: each figure's median and min-max over the repeats. See
// bench/README.md. Run from the module root: go run ./bench (or make bench).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

type opts struct {
	repeats         int
	events          int
	payload         int
	bigEvents       int
	largeEvents     int
	largePayload    int
	largeHold       time.Duration
	bigRepeats      int
	rate            int
	latencyDuration time.Duration
	liveDuration    time.Duration
	idleDuration    time.Duration
	scenarios       string
	profileDir      string
	partitions      int
	relayArgs       []string
	relayEnv        []string
	relayB          string // second relay binary for A/B runs (drain, latency)
}

func main() {
	var o opts
	flag.IntVar(&o.repeats, "repeats", 3, "runs of every scenario (median and min-max are reported)")
	flag.IntVar(&o.events, "events", 200000, "events for drain, the ceilings and the polling drain")
	flag.IntVar(&o.payload, "payload", 400, "payload size in bytes")
	flag.IntVar(&o.bigEvents, "bigtx-events", 1000000, "events in the big-tx transaction")
	flag.IntVar(&o.bigRepeats, "bigtx-repeats", 0, "runs of big-tx (0: -repeats)")
	flag.IntVar(&o.largeEvents, "large-events", 1000, "events in the large scenario")
	flag.DurationVar(&o.largeHold, "large-hold", 8*time.Second, "how long the large scenario holds JetStream's acks back (under 10 s: nats.go then declares the connection stale)")
	flag.IntVar(&o.largePayload, "large-payload", 900<<10, "payload size in bytes in the large scenario (with the relay's headers it must fit the server's max_payload, 1 MiB)")
	flag.IntVar(&o.rate, "rate", 1000, "events/s in the latency scenarios")
	flag.DurationVar(&o.latencyDuration, "latency-duration", 30*time.Second, "duration of each latency run")
	flag.DurationVar(&o.liveDuration, "live-duration", 10*time.Second, "duration of each live run")
	flag.DurationVar(&o.idleDuration, "idle-duration", 5*time.Second, "idle window for statements/s")
	flag.StringVar(&o.scenarios, "scenarios", "drain,drain1,live,latency,latency-fsync,big-tx,polling,scale,tables,large", "comma-separated scenarios to run")
	flag.StringVar(&o.profileDir, "profile", "", "write CPU and allocation profiles of the relay's first drain and latency runs (each mode) to this directory")
	flag.IntVar(&o.partitions, "partitions", 2, "relays in the scale scenario (compared with 1)")
	relayArgs := flag.String("relay-args", "", "extra flags for the relay in the drain scenario, space separated (e.g. \"--max-in-flight 4096\")")
	flag.StringVar(&o.relayB, "relay-b", "", "a second relay binary (e.g. built from another commit): drain and latency also run it, in the same repeat, and report it as \"B\"")
	relayEnv := flag.String("relay-env", "", "extra environment for the relay in the drain and large scenarios, space separated (e.g. GOGC=200)")
	flag.Parse()
	o.relayEnv = strings.Fields(*relayEnv)
	o.relayArgs = strings.Fields(*relayArgs)
	if o.bigRepeats == 0 {
		o.bigRepeats = o.repeats
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type scenario struct {
	name    string
	repeats int
	run     func(context.Context, opts, int) (figures, error)
}

func run(ctx context.Context, o opts) error {
	e, err := setup(ctx)
	if err != nil {
		return err
	}
	defer e.close()
	all := []scenario{
		{"drain", o.repeats, e.runDrain},
		{"drain1", o.repeats, e.runDrain1},
		{"live", o.repeats, e.runLive},
		{"latency", o.repeats, e.runLatency},
		{"latency-fsync", o.repeats, e.runLatencyFsync},
		{"big-tx", o.bigRepeats, e.runBigTx},
		{"polling", o.repeats, e.runPolling},
		{"scale", o.repeats, e.runScale},
		{"tables", o.repeats, e.runTables},
		{"large", o.repeats, e.runLarge},
	}
	want := strings.Split(o.scenarios, ",")
	res := map[string][]float64{}
	var order []string
	started := time.Now()
	for _, s := range all {
		if !slices.Contains(want, s.name) {
			continue
		}
		for r := 0; r < s.repeats; r++ {
			t0 := time.Now()
			f, err := s.run(ctx, o, r)
			if err != nil {
				printTable(o, started, order, res)
				return fmt.Errorf("%s run %d: %w", s.name, r+1, err)
			}
			keys := make([]string, 0, len(f))
			for k := range f {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			for _, k := range keys {
				if _, ok := res[k]; !ok {
					order = append(order, k)
				}
				res[k] = append(res[k], f[k])
			}
			fmt.Fprintf(os.Stderr, "bench: %s run %d/%d done in %s (load average %s)\n", s.name, r+1, s.repeats, time.Since(t0).Round(time.Millisecond), loadavg())
		}
	}
	printTable(o, started, order, res)
	return nil
}

func printTable(o opts, started time.Time, order []string, res map[string][]float64) {
	fmt.Printf("\noutbox-relay bench, %s, %d CPUs (%s), Go %s, %d events of %d bytes, %d repeats; took %s; load average at end %s\n\n",
		time.Now().Format("2006-01-02 15:04"), runtime.NumCPU(), cpuModel(), runtime.Version(), o.events, o.payload, o.repeats,
		time.Since(started).Round(time.Second), loadavg())
	fmt.Println("| figure | median | min - max | runs |")
	fmt.Println("|---|---:|---:|---:|")
	for _, k := range order {
		v := slices.Clone(res[k])
		slices.Sort(v)
		fmt.Printf("| %s | %s | %s - %s | %d |\n", k, num(v[len(v)/2]), num(v[0]), num(v[len(v)-1]), len(v))
	}
}

func num(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "?"
}
