package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATSCluster is a JetStream cluster of nats-server processes on loopback, for tests of
// replicated streams: each node has its own client and route port and store directory, and
// can be killed with SIGKILL, paused with SIGSTOP and restarted.
type NATSCluster struct {
	Name  string
	Nodes []*NATSProcess
	Names []string // server_name of each node, n1, n2, ...
	// URL lists every node's client URL, comma separated (nats.Connect takes it as is).
	URL string

	monitorURLs []string // each node's HTTP monitoring endpoint, in Nodes' order
}

// StartNATSCluster starts a JetStream cluster of n nodes (n ≥ 3 for replicated streams),
// waits until every node answers JetStream requests, and stops it in t.Cleanup.
func StartNATSCluster(t testing.TB, n int) *NATSCluster {
	t.Helper()
	bin := NATSServerBinary(t)
	c, err := startNATSCluster(bin, n, t.TempDir())
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		for _, p := range c.Nodes {
			_ = p.Resume() // a paused node would ignore nothing but SIGKILL anyway
			if err := p.Kill(); err != nil && !errors.Is(err, errNotRunning) {
				t.Errorf("testenv: %v", err)
			}
		}
	})
	return c
}

func startNATSCluster(bin string, n int, dir string) (*NATSCluster, error) {
	c := &NATSCluster{Name: "outbox-relay-test"}
	ports, err := freePorts(3 * n) // distinct: a route port equal to a client port fails to bind
	if err != nil {
		return nil, err
	}
	clientPorts, routePorts, monitorPorts := ports[:n], ports[n:2*n], ports[2*n:]
	var urls []string
	for i := range n {
		name := fmt.Sprintf("n%d", i+1)
		nodeDir := filepath.Join(dir, name)
		if err := os.MkdirAll(nodeDir, 0o755); err != nil {
			return nil, err
		}
		var routes []string
		for j := range n {
			if j != i {
				routes = append(routes, fmt.Sprintf("%q", fmt.Sprintf("nats://127.0.0.1:%d", routePorts[j])))
			}
		}
		p := &NATSProcess{
			URL:        fmt.Sprintf("nats://127.0.0.1:%d", clientPorts[i]),
			Port:       clientPorts[i],
			StoreDir:   filepath.Join(nodeDir, "jetstream"),
			ConfigFile: filepath.Join(nodeDir, "nats-server.conf"),
			LogFile:    filepath.Join(nodeDir, "nats-server.log"),
			Binary:     bin,
		}
		c.monitorURLs = append(c.monitorURLs, fmt.Sprintf("http://127.0.0.1:%d", monitorPorts[i]))
		// server_tags node:<name>: a test can place a stream on a node (Placement.Tags).
		conf := fmt.Sprintf(`server_name: %q
server_tags: ["node:%s"]
listen: "127.0.0.1:%d"
http: "127.0.0.1:%d"
jetstream {
  store_dir: %q
}
cluster {
  name: %q
  listen: "127.0.0.1:%d"
  routes: [%s]
}
`, name, name, clientPorts[i], monitorPorts[i], p.StoreDir, c.Name, routePorts[i], strings.Join(routes, ", "))
		if err := os.WriteFile(p.ConfigFile, []byte(conf), 0o644); err != nil {
			return nil, fmt.Errorf("write nats-server config: %w", err)
		}
		c.Nodes = append(c.Nodes, p)
		c.Names = append(c.Names, name)
		urls = append(urls, p.URL)
	}
	c.URL = strings.Join(urls, ",")

	// No node serves JetStream before a quorum of them has elected a meta leader: start all,
	// then wait for each.
	kill := func() {
		for _, p := range c.Nodes {
			_ = p.Kill()
		}
	}
	for _, p := range c.Nodes {
		p.mu.Lock()
		err := p.spawnLocked()
		p.mu.Unlock()
		if err != nil {
			kill()
			return nil, err
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, p := range c.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.mu.Lock()
			defer p.mu.Unlock()
			errs[i] = p.waitReadyLocked(natsProcReadyWait)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		kill()
		return nil, fmt.Errorf("start a %d-node nats-server cluster: %w", n, err)
	}
	if err := c.waitPlacement(n, natsProcReadyWait); err != nil {
		kill()
		return nil, fmt.Errorf("start a %d-node nats-server cluster: %w", n, err)
	}
	return c, nil
}

// waitPlacement waits until the cluster places a stream of n replicas: a node answers
// JetStream requests once a meta leader is elected, but the leader may not yet count every
// peer, and a stream created then fails with "no suitable peers for placement" (10005).
func (c *NATSCluster) waitPlacement(n int, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	const probe = "TESTENV_PLACEMENT_PROBE"
	var lastErr error
	for ctx.Err() == nil {
		lastErr = func() error {
			js, done, err := c.jetStream()
			if err != nil {
				return err
			}
			defer done()
			if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: probe, Subjects: []string{"testenv.placement.probe"},
				Replicas: n, Storage: jetstream.MemoryStorage}); err != nil {
				return err
			}
			return js.DeleteStream(ctx, probe)
		}()
		if lastErr == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no stream of %d replicas could be placed within %s: %w", n, wait, lastErr)
}

// Node returns the node whose server_name is name, or nil.
func (c *NATSCluster) Node(name string) *NATSProcess {
	for i, n := range c.Names {
		if n == name {
			return c.Nodes[i]
		}
	}
	return nil
}

// connect connects to any running node.
func (c *NATSCluster) connect() (*nats.Conn, error) {
	return nats.Connect(c.URL, nats.Timeout(2*time.Second), nats.NoReconnect())
}

// jetStream is JetStream on a connection to any running node; done closes the connection.
func (c *NATSCluster) jetStream() (js jetstream.JetStream, done func(), err error) {
	nc, err := c.connect()
	if err != nil {
		return nil, nil, err
	}
	if js, err = jetstream.New(nc); err != nil {
		nc.Close()
		return nil, nil, err
	}
	return js, nc.Close, nil
}

// streamInfo reads stream's info from any running node.
func (c *NATSCluster) streamInfo(ctx context.Context, stream string) (*jetstream.StreamInfo, error) {
	js, done, err := c.jetStream()
	if err != nil {
		return nil, err
	}
	defer done()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := js.Stream(rctx, stream)
	if err != nil {
		return nil, err
	}
	return s.CachedInfo(), nil
}

// StreamLeader returns the server_name of stream's current leader, asking the cluster until
// one is elected or ctx ends.
func (c *NATSCluster) StreamLeader(ctx context.Context, stream string) (string, error) {
	var lastErr error
	for {
		leader, err := c.streamLeader(ctx, stream)
		if err == nil && leader != "" {
			return leader, nil
		}
		if err == nil {
			err = errors.New("no leader")
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("leader of stream %s: %w", stream, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *NATSCluster) streamLeader(ctx context.Context, stream string) (string, error) {
	info, err := c.streamInfo(ctx, stream)
	if err != nil {
		return "", err
	}
	if ci := info.Cluster; ci != nil {
		return ci.Leader, nil
	}
	return "", nil
}

// StepDown asks stream's leader to step down ($JS.API.STREAM.LEADER.STEPDOWN.<stream>) and
// returns the leader that did.
func (c *NATSCluster) StepDown(ctx context.Context, stream string) (string, error) {
	old, err := c.StreamLeader(ctx, stream)
	if err != nil {
		return "", err
	}
	nc, err := c.connect()
	if err != nil {
		return "", err
	}
	defer nc.Close()
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, err := nc.RequestWithContext(rctx, "$JS.API.STREAM.LEADER.STEPDOWN."+stream, nil)
	if err != nil {
		return "", fmt.Errorf("step down the leader of stream %s: %w", stream, err)
	}
	var resp struct {
		Success bool `json:"success"`
		Error   *struct {
			Code        int    `json:"code"`
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return "", fmt.Errorf("step down the leader of stream %s: %w: %s", stream, err, m.Data)
	}
	if !resp.Success {
		if resp.Error != nil {
			return "", fmt.Errorf("step down the leader of stream %s: %s (%d)", stream, resp.Error.Description, resp.Error.ErrCode)
		}
		return "", fmt.Errorf("step down the leader of stream %s: %s", stream, m.Data)
	}
	return old, nil
}

// WaitNewLeader waits until stream has a leader other than old and returns it.
func (c *NATSCluster) WaitNewLeader(ctx context.Context, stream, old string) (string, error) {
	for {
		leader, err := c.streamLeader(ctx, stream)
		if err == nil && leader != "" && leader != old {
			return leader, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("stream %s has no leader other than %s: %v", stream, old, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// WaitStreamCurrent waits until stream has a leader and every other replica is current (a
// restarted node has caught up), and returns the leader.
func (c *NATSCluster) WaitStreamCurrent(ctx context.Context, stream string) (string, error) {
	var last string
	for {
		leader, state, err := c.streamReplicas(ctx, stream)
		if err == nil && leader != "" && state == "" {
			return leader, nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = state
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("stream %s: replicas not current: %s", stream, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// streamReplicas returns stream's leader and, when a replica is not current, what it is.
func (c *NATSCluster) streamReplicas(ctx context.Context, stream string) (leader, notCurrent string, err error) {
	info, err := c.streamInfo(ctx, stream)
	if err != nil {
		return "", "", err
	}
	ci := info.Cluster
	if ci == nil {
		return "", "", fmt.Errorf("stream %s has no cluster info", stream)
	}
	if len(ci.Replicas)+1 < info.Config.Replicas {
		return ci.Leader, fmt.Sprintf("%d of %d replicas known", len(ci.Replicas)+1, info.Config.Replicas), nil
	}
	for _, r := range ci.Replicas {
		if !r.Current || r.Offline {
			return ci.Leader, fmt.Sprintf("replica %s current=%v offline=%v lag=%d", r.Name, r.Current, r.Offline, r.Lag), nil
		}
	}
	return ci.Leader, "", nil
}

// ClientNode returns the server_name of the node a client named name (nats.Name) is connected
// to, asking each running node's monitoring endpoint (/connz).
func (c *NATSCluster) ClientNode(ctx context.Context, name string) (string, error) {
	for i, u := range c.monitorURLs {
		if c.Nodes[i].PID() == 0 {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		req, err := http.NewRequestWithContext(rctx, http.MethodGet, u+"/connz?limit=1024", nil)
		if err != nil {
			cancel()
			return "", err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			cancel()
			continue // paused or restarting
		}
		var connz struct {
			Connections []struct {
				Name string `json:"name"`
			} `json:"connections"`
		}
		err = json.NewDecoder(resp.Body).Decode(&connz)
		resp.Body.Close()
		cancel()
		if err != nil {
			continue
		}
		for _, conn := range connz.Connections {
			if conn.Name == name {
				return c.Names[i], nil
			}
		}
	}
	return "", fmt.Errorf("no running node has a client named %q", name)
}
