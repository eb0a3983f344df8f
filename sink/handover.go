package sink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// The hand-over lets outbox-relay backfill publish into a replicated stream next to a live
// relay. The relay chains its publishes there on a predicted stream sequence, which a message
// stored by anyone else can break (see the package doc), so the two take turns, through a key
// of the position bucket:
//
//  1. backfill creates the key: {"state":"requested"};
//  2. the relay (watching it) stops sending, waits until every message it sent has an outcome,
//     and writes {"state":"granted","seq":S}, S being the stream's last sequence then;
//  3. backfill publishes one chunk (at most BackfillChunk messages, BackfillChunkTime), one
//     message at a time, each with Nats-Expected-Last-Sequence = the sequence of the one before
//     (S for the first), and deletes the key;
//  4. the relay restarts its chain at the stream's last sequence with one message alone (the
//     probe, see Publisher.Pause) and sends the rest of its window once that is stored.
//
// A backfill that dies does not stall the relay: a grant lasts LeaseTTL, after which the relay
// deletes the key and goes on. A backfill that is only slow stops publishing before its lease
// ends (it counts from before its request, so its lease ends before the relay's), and a message
// of it still on its way when the relay resumes cannot break the relay's chain (the probe).
const (
	// LeaseTTL is how long a grant lasts at most.
	LeaseTTL = 30 * time.Second
	// BackfillChunk is the most messages backfill publishes in one grant.
	BackfillChunk = 1000
	// BackfillChunkTime is the longest backfill holds a grant while it has messages to
	// publish: with the relay's drain before the grant, what live events wait at most.
	BackfillChunkTime = 2 * time.Second
)

// Lease states.
const (
	LeaseRequested = "requested"
	LeaseGranted   = "granted"
)

// Lease is the value of the hand-over key.
type Lease struct {
	State  string `json:"state"`
	Holder string `json:"holder"` // who asked, for operators: backfill <pid>@<host>
	// Seq is, once granted, the stream's last sequence when the relay stopped publishing: the
	// first backfilled message expects it.
	Seq uint64 `json:"seq,omitempty"`
	// GrantedBy: relay, or backfill when no relay was streaming.
	GrantedBy string    `json:"granted_by,omitempty"`
	At        time.Time `json:"at"`
}

// HandoverKey is the hand-over key of cfg's stream and subject prefix in the position bucket.
func HandoverKey(stream, prefix string) string { return PositionKey(stream, prefix) + ".handover" }

// ServeHandover grants backfill's hand-over requests for the record's stream until ctx ends:
// pub pauses (drains) for each grant and resumes when the key is deleted or the grant has lasted
// LeaseTTL. A key found granted when it starts (by a backfill that found no relay streaming, or
// to an earlier session) pauses pub too.
func (r *PositionRecord) ServeHandover(ctx context.Context, pub *Publisher, log zerolog.Logger) error {
	key := r.key + ".handover"
	s, err := r.js.Stream(ctx, r.stream)
	if err != nil {
		return fmt.Errorf("look up stream %s: %w", r.stream, err)
	}
	if s.CachedInfo().Config.Replicas <= 1 && !pub.seqChained() {
		return nil // backfill publishes next to the relay's msg-id chain without a hand-over
	}
	w, err := r.store.kv.Watch(ctx, key)
	if err != nil {
		if ctx.Err() == nil {
			log.Warn().Err(err).Str("key", key).
				Msg("cannot watch the hand-over key: a backfill into this replicated stream will wait for this relay in vain (the relay's NATS user needs $JS.API.CONSUMER.CREATE.KV_<bucket>.> as well)")
		}
		return nil
	}
	defer func() { _ = w.Stop() }()
	var (
		paused bool
		rev    uint64 // revision of the grant being served
		expiry *time.Timer
		expire <-chan time.Time
	)
	var resume func(string)
	// Resuming is always safe (the chain restarts with a probe): a session that ends does
	// not leave the next one, or its drain, paused.
	defer func() { resume("the session ends") }()
	resume = func(why string) {
		if expiry != nil {
			expiry.Stop()
			expiry, expire = nil, nil
		}
		if paused {
			paused = false
			pub.Resume()
			log.Info().Str("key", key).Str("why", why).Msg("hand-over ended: publishing again")
		}
	}
	hold := func(grantRev uint64) error {
		if !paused {
			if err := pub.Pause(ctx); err != nil {
				return err
			}
			paused = true
		}
		if rev != grantRev || expiry == nil {
			rev = grantRev
			if expiry != nil {
				expiry.Stop()
			}
			expiry = time.NewTimer(LeaseTTL)
			expire = expiry.C
		}
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-expire:
			log.Warn().Str("key", key).Stringer("lease", LeaseTTL).
				Msg("the backfill holding the stream did not hand it back within the lease: taking it back")
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_ = r.store.kv.Delete(dctx, key, jetstream.LastRevision(rev))
			cancel()
			resume("lease expired")
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("the watch of the hand-over key %s ended", key)
			}
			if e == nil {
				continue // the current value was delivered
			}
			if e.Operation() != jetstream.KeyValuePut {
				resume("released")
				continue
			}
			var l Lease
			if err := json.Unmarshal(e.Value(), &l); err != nil {
				log.Warn().Err(err).Str("key", key).Msg("ignoring a hand-over key that is not a lease")
				continue
			}
			switch l.State {
			case LeaseRequested:
				if !paused {
					if err := pub.Pause(ctx); err != nil {
						return nil // ctx ended
					}
					paused = true
				}
				s, err := r.js.Stream(ctx, r.stream)
				if err != nil {
					log.Warn().Err(err).Msg("hand-over: cannot read the stream's last sequence; not granting")
					resume("stream not readable")
					continue
				}
				l.State, l.Seq, l.GrantedBy, l.At = LeaseGranted, s.CachedInfo().State.LastSeq, "relay", time.Now().UTC()
				b, _ := json.Marshal(l)
				grantRev, err := r.store.kv.Update(ctx, key, b, e.Revision())
				if err != nil {
					// Released or taken over meanwhile: the watch tells what happened.
					log.Debug().Err(err).Msg("hand-over: grant not written")
					continue
				}
				if err := hold(grantRev); err != nil {
					return nil
				}
				log.Info().Str("key", key).Str("holder", l.Holder).Uint64("seq", l.Seq).
					Msg("hand-over: publishing paused for a backfill")
			case LeaseGranted:
				if err := hold(e.Revision()); err != nil {
					return nil
				}
			}
		}
	}
}

// Handover is backfill's side of the hand-over of a replicated stream.
type Handover struct {
	kv     jetstream.KeyValue
	js     jetstream.JetStream
	key    string
	stream string
	holder string
	rev    uint64    // revision of our lease (requested or granted)
	asked  time.Time // when the lease was requested: it ends LeaseTTL after this, at the latest
	log    zerolog.Logger
}

// handoverRecheck: how often Acquire checks again whether a relay streams.
const handoverRecheck = time.Second

// ErrNoHandover: no relay granted the hand-over while one streams.
var ErrNoHandover = errors.New("no relay answered the hand-over request")

// OpenHandover opens the hand-over key of cfg's stream in bucket (which must exist).
func OpenHandover(ctx context.Context, js jetstream.JetStream, bucket string, cfg Config, log zerolog.Logger) (*Handover, error) {
	cfg.fill()
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("open the position record bucket %q for the hand-over: %w", bucket, err)
	}
	host, _ := os.Hostname()
	return &Handover{kv: kv, js: js, key: HandoverKey(cfg.Stream, cfg.SubjectPrefix), stream: cfg.Stream,
		holder: fmt.Sprintf("backfill %d@%s", os.Getpid(), host), log: log}, nil
}

// Acquire requests the stream and waits until a relay grants it. When none does within
// grantWait and relayLive reports that no relay streams, the backfill grants it to itself (a
// relay starting then waits for the release). It returns the sequence the first message must
// expect and when the lease ends (publish nothing after it).
func (h *Handover) Acquire(ctx context.Context, grantWait, maxWait time.Duration, relayLive func(context.Context) (bool, error)) (seq uint64, until time.Time, err error) {
	start := time.Now()
	for {
		h.asked = time.Now()
		b, _ := json.Marshal(Lease{State: LeaseRequested, Holder: h.holder, At: h.asked.UTC()})
		h.rev, err = h.kv.Create(ctx, h.key, b)
		if err == nil {
			break
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return 0, time.Time{}, fmt.Errorf("request the hand-over of stream %s (%s): %w", h.stream, h.key, err)
		}
		// Another backfill holds it, or a dead one's request waits for a relay to expire it.
		e, gerr := h.kv.Get(ctx, h.key)
		if gerr == nil && time.Since(e.Created()) > 2*LeaseTTL {
			// Nobody served it: take it over.
			if h.rev, err = h.kv.Update(ctx, h.key, b, e.Revision()); err == nil {
				break
			}
		}
		if time.Since(start) > maxWait {
			return 0, time.Time{}, fmt.Errorf("the hand-over key %s of stream %s is held (another backfill?) for over %s", h.key, h.stream, maxWait)
		}
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return 0, time.Time{}, ctx.Err()
		}
	}
	w, err := h.kv.Watch(ctx, h.key)
	if err != nil {
		h.Release(ctx)
		return 0, time.Time{}, fmt.Errorf("watch the hand-over key %s: %w", h.key, err)
	}
	defer func() { _ = w.Stop() }()
	selfCheck := time.After(grantWait)
	giveUp := time.After(maxWait)
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return 0, time.Time{}, fmt.Errorf("the watch of the hand-over key %s ended", h.key)
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut || e.Revision() < h.rev {
				continue
			}
			var l Lease
			if json.Unmarshal(e.Value(), &l) != nil || l.Holder != h.holder {
				return 0, time.Time{}, fmt.Errorf("the hand-over key %s was taken over: %s", h.key, e.Value())
			}
			if l.State == LeaseGranted {
				h.rev = e.Revision()
				return l.Seq, h.asked.Add(LeaseTTL - DefaultAckTimeout), nil
			}
		case <-selfCheck:
			// The last sequence is read before the check: a relay that starts streaming after
			// the check stores its first message alone, after that sequence, and from then on
			// the grant's first message is refused.
			s, err := h.js.Stream(ctx, h.stream)
			if err != nil {
				h.Release(ctx)
				return 0, time.Time{}, fmt.Errorf("look up stream %s: %w", h.stream, err)
			}
			last := s.CachedInfo().State.LastSeq
			live, err := relayLive(ctx)
			if err != nil {
				h.Release(ctx)
				return 0, time.Time{}, err
			}
			if live {
				selfCheck = time.After(handoverRecheck)
				continue
			}
			l := Lease{State: LeaseGranted, Holder: h.holder, Seq: last, GrantedBy: "backfill", At: time.Now().UTC()}
			b, _ := json.Marshal(l)
			if rev, err := h.kv.Update(ctx, h.key, b, h.rev); err == nil {
				h.rev = rev
				return l.Seq, h.asked.Add(LeaseTTL - DefaultAckTimeout), nil
			}
			// A relay granted it meanwhile: the watch shows it.
		case <-giveUp:
			h.Release(ctx)
			return 0, time.Time{}, fmt.Errorf("%w within %s (key %s of stream %s), yet a replication slot streams: the relay must run with the same Config.PositionBucket (its default) and Config.Sink.Stream/Config.Sink.SubjectPrefix, in a version that serves the hand-over; or stop the relay for the backfill", ErrNoHandover, maxWait, h.key, h.stream)
		case <-ctx.Done():
			h.Release(context.Background())
			return 0, time.Time{}, ctx.Err()
		}
	}
}

// Release hands the stream back (deletes the key if it is still ours).
func (h *Handover) Release(ctx context.Context) {
	if h.rev == 0 {
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := h.kv.Delete(dctx, h.key, jetstream.LastRevision(h.rev)); err != nil {
		h.log.Debug().Err(err).Msg("hand-over: release")
	}
	h.rev = 0
}

// Pause stops publishing for a hand-over of the stream to another publisher (outbox-relay
// backfill on a replicated stream): nothing more is sent, and Pause returns once every message
// sent has an outcome (stored and confirmed, or failed and queued to be re-sent), or ctx ends.
// Events published meanwhile are queued (the window still bounds them). Resume ends it.
//
// A sequence chain (replicated stream) is safe only while the relay is the only publisher: a
// foreign message can take the sequence the relay predicted for one of its messages, and the
// next one would be stored after a gap. Resume and a session's start therefore restart the
// chain at the stream's last sequence with one message alone (the probe), and send the rest
// of the window only once it is stored. A foreign publisher that chains each of its messages on
// the sequence of its previous one, one at a time (as backfill does), cannot then break the
// relay's chain even if it keeps publishing past its lease: its next message expects a
// sequence at or below the one the probe was checked against, so it is either stored before
// the probe (which is refused and sent again, alone) or refused for good.
func (p *Publisher) Pause(ctx context.Context) error {
	p.mu.Lock()
	if !p.paused {
		p.paused, p.resume = true, false
		p.drained = make(chan struct{})
	}
	d := p.drained
	p.mu.Unlock()
	p.wake()
	select {
	case <-d:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Resume ends a Pause: Run restarts the chain at the stream's last sequence with a probe.
func (p *Publisher) Resume() {
	p.mu.Lock()
	if p.paused {
		p.paused, p.resume, p.recovering = false, true, true
	}
	p.mu.Unlock()
	p.wake()
}

// hold serves a Pause and a Resume for Run: while paused and no send awaits its outcome, it
// reports the window drained and waits; after a Resume it restarts the chain. It reports
// whether Run's loop should start over.
func (p *Publisher) hold(ctx context.Context, status <-chan nats.Status) bool {
	p.mu.Lock()
	paused, resume := p.paused, p.resume
	if !paused && !resume {
		p.mu.Unlock()
		return false
	}
	busy := false
	for _, e := range p.q {
		busy = busy || e.token != 0
	}
	if paused && !busy {
		select {
		case <-p.drained:
		default:
			close(p.drained)
		}
	}
	if resume {
		p.resume = false
		if p.seqChain {
			p.fenced = true
		}
	}
	p.mu.Unlock()
	switch {
	case resume:
		// A failure leaves the queue unsent (recovering); Run's recovery retries.
		p.resync(ctx)
		return true
	case paused && !busy:
		p.idle(ctx, status)
		return true
	}
	return false
}

// unfence lets the rest of the window go once the probe e is stored.
func (p *Publisher) unfence(e *entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.probe != e {
		return
	}
	p.probe, p.fenced, p.recovering = nil, false, false
	if !p.paused {
		p.sendQueued()
	}
}
