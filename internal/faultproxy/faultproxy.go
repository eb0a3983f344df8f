// Package faultproxy is a TCP proxy for fault-injection tests: it sits between the relay and a
// server (NATS or Postgres) on 127.0.0.1 and, on command, stops forwarding (blackhole), resets
// every connection, cuts a connection after a number of bytes, or, for the NATS client
// protocol, silently drops chosen publish frames while the connection stays up.
//
// It needs no root and is deterministic, unlike packet filters.
package faultproxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
)

// Proxy forwards connections accepted on Addr to a target address.
type Proxy struct {
	ln     net.Listener
	target string

	mu        sync.Mutex
	cond      *sync.Cond
	blackhole bool
	holdDown  bool // server to client held: requests arrive, replies do not
	refuse    bool
	cutAfter  int64 // > 0: reset each connection once this many more client bytes passed
	drop      func(subject string, header []byte) bool
	links     map[*link]struct{}
	closed    bool
	nats      bool // client to server is parsed as NATS protocol frames
	dropped   int
	accepted  int
}

type link struct {
	client, server net.Conn
	sent           int64 // client -> server bytes forwarded
}

// Start listens on a free port of 127.0.0.1 and forwards to target.
func Start(target string) (*Proxy, error) { return start(target, false) }

func start(target string, natsFrames bool) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, links: map[*link]struct{}{}, nats: natsFrames}
	p.cond = sync.NewCond(&p.mu)
	go p.accept()
	return p, nil
}

// Stats returns the number of connections accepted and of publish frames dropped.
func (p *Proxy) Stats() (accepted, dropped int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted, p.dropped
}

// StartNATS is Start for a NATS server: client to server traffic is forwarded frame by frame
// (a control line, or a PUB/HPUB with its payload), so DropNATSPublish can drop one message
// cleanly and a cut lands between or inside frames as the byte count says.
func StartNATS(target string) (*Proxy, error) { return start(target, true) }

// Addr is host:port of the proxy.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Port of the proxy.
func (p *Proxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// Close stops the proxy and closes every connection.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.blackhole, p.holdDown = false, false
	p.cond.Broadcast()
	p.mu.Unlock()
	p.ln.Close()
	p.Reset()
}

// Pass forwards everything again (ends a blackhole or refusal; bytes held during a blackhole
// are delivered, as after a healed partition).
func (p *Proxy) Pass() {
	p.mu.Lock()
	p.blackhole, p.holdDown, p.refuse, p.cutAfter = false, false, false, 0
	p.cond.Broadcast()
	p.mu.Unlock()
}

// Blackhole stops forwarding in both directions while keeping every socket open, like a
// network partition: peers see silence, not an error. New connections are accepted and
// silenced too.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	p.blackhole = true
	p.mu.Unlock()
}

// HoldReplies stops forwarding from server to client only: the server gets every request and
// stores every publish, the client sees no ack (a lost ack). Pass delivers what was held.
func (p *Proxy) HoldReplies() {
	p.mu.Lock()
	p.holdDown = true
	p.mu.Unlock()
}

// Refuse resets new connections at once until Pass.
func (p *Proxy) Refuse() {
	p.mu.Lock()
	p.refuse = true
	p.mu.Unlock()
}

// Reset closes every open connection with a TCP RST. New connections are still accepted.
func (p *Proxy) Reset() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.reset()
	}
}

// CutAfter resets each open or new connection once n more bytes went from client to server,
// possibly in the middle of a message. Pass clears it.
func (p *Proxy) CutAfter(n int64) {
	p.mu.Lock()
	p.cutAfter = n
	for l := range p.links {
		l.sent = 0
	}
	p.mu.Unlock()
}

// DropNATSPublish makes the proxy parse the NATS client protocol (client to server) and drop
// every PUB/HPUB frame for which match returns true, without any error on the connection. The
// server never sees the message, and later ones on the same connection go through: the one
// fault TCP itself never produces, and exactly the one that reorders a plain async window.
// nil stops dropping. Only for a proxy made by StartNATS.
func (p *Proxy) DropNATSPublish(match func(subject string, header []byte) bool) {
	p.mu.Lock()
	p.drop = match
	p.mu.Unlock()
}

func (p *Proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.accepted++
		refuse := p.refuse
		p.mu.Unlock()
		if refuse {
			rst(c)
			continue
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			rst(c)
			continue
		}
		l := &link{client: c, server: s}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			l.reset()
			return
		}
		p.links[l] = struct{}{}
		p.mu.Unlock()
		go p.pump(l, true)
		go p.pump(l, false)
	}
}

func rst(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
}

func (l *link) reset() {
	rst(l.client)
	rst(l.server)
}

// pump copies one direction of l. Client to server goes frame by frame when NATS publishes
// may be dropped, else chunk by chunk.
func (p *Proxy) pump(l *link, up bool) {
	src, dst := l.server, l.client
	if up {
		src, dst = l.client, l.server
	}
	defer func() {
		p.mu.Lock()
		delete(p.links, l)
		p.mu.Unlock()
		l.reset()
	}()
	r := bufio.NewReaderSize(src, 64<<10)
	buf := make([]byte, 32<<10)
	for {
		var chunk []byte
		var err error
		framed := up && p.nats // set at start, never changed
		if framed {
			chunk, err = readNATSFrame(r)
		} else {
			var n int
			n, err = r.Read(buf)
			chunk = buf[:n]
		}
		if len(chunk) > 0 {
			if !p.forward(l, up, dst, chunk, framed) {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// forward writes chunk to dst unless a fault says otherwise; false ends the link.
func (p *Proxy) forward(l *link, up bool, dst io.Writer, chunk []byte, framed bool) bool {
	p.mu.Lock()
	for (p.blackhole || (!up && p.holdDown)) && !p.closed {
		p.cond.Wait()
	}
	if p.closed {
		p.mu.Unlock()
		return false
	}
	if framed && p.drop != nil {
		if subj, hdr, ok := publishFrame(chunk); ok && p.drop(subj, hdr) {
			p.dropped++
			p.mu.Unlock()
			return true
		}
	}
	cut := false
	if up && p.cutAfter > 0 {
		if l.sent+int64(len(chunk)) >= p.cutAfter {
			chunk = chunk[:p.cutAfter-l.sent]
			cut = true
		}
		l.sent += int64(len(chunk))
	}
	p.mu.Unlock()
	if _, err := dst.Write(chunk); err != nil {
		return false
	}
	return !cut
}

// readNATSFrame returns one client protocol operation: a control line, or a PUB/HPUB line with
// its payload.
func readNATSFrame(r *bufio.Reader) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return append([]byte(nil), line...), err
	}
	frame := append([]byte(nil), line...)
	f := bytes.Fields(line)
	if len(f) < 3 {
		return frame, nil
	}
	op := string(bytes.ToUpper(f[0]))
	if op != "PUB" && op != "HPUB" {
		return frame, nil
	}
	total, err := strconv.Atoi(string(f[len(f)-1]))
	if err != nil {
		return frame, fmt.Errorf("faultproxy: bad %s line %q", op, line)
	}
	body := make([]byte, total+2)
	if _, err := io.ReadFull(r, body); err != nil {
		return frame, err
	}
	return append(frame, body...), nil
}

// publishFrame returns the subject and header block of a PUB/HPUB frame.
func publishFrame(frame []byte) (subject string, header []byte, ok bool) {
	i := bytes.IndexByte(frame, '\n')
	if i < 0 {
		return "", nil, false
	}
	f := bytes.Fields(frame[:i])
	if len(f) < 3 {
		return "", nil, false
	}
	body := frame[i+1:]
	switch string(bytes.ToUpper(f[0])) {
	case "PUB":
		return string(f[1]), nil, true
	case "HPUB":
		if len(f) < 4 {
			return "", nil, false
		}
		hl, err := strconv.Atoi(string(f[len(f)-2]))
		if err != nil || hl > len(body) {
			return "", nil, false
		}
		return string(f[1]), body[:hl], true
	}
	return "", nil, false
}
