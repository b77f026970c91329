package p2p

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
	madns "github.com/multiformats/go-multiaddr-dns"
	"go.uber.org/zap/zaptest"
)

// TestOutsiderGetsNoProtocol: a host without this swarm's key (none,
// another one, or the right one with pnet on one side only) never reaches a
// protocol handler and is not left connected, and the member says why.
func TestOutsiderGetsNoProtocol(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeSwarmKey(t, dir, "swarm.key")
	other := writeSwarmKey(t, dir, "other.key")
	for _, tt := range []struct {
		name     string
		outsider Config
		member   Config
		notMem   bool // the failure is the membership proof, so the error says the keys differ
	}{
		{name: "no key", member: Config{SwarmKeyFile: key}},
		{name: "another key", outsider: Config{SwarmKeyFile: other}, member: Config{SwarmKeyFile: key}, notMem: true},
		{name: "another key, pnet", outsider: Config{SwarmKeyFile: other, PrivateNetwork: true}, member: Config{SwarmKeyFile: key, PrivateNetwork: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			member := newTestHost(t, tt.member)
			var served atomic.Int64
			member.SetStreamHandler("/starling/test-secret/1", func(s network.Stream) {
				served.Add(1)
				_, _ = s.Write([]byte("secret"))
				s.Close()
			})
			outsider := newTestHost(t, tt.outsider)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			outsider.Peerstore().AddAddrs(member.ID(), member.Addrs(), time.Minute)
			s, err := outsider.NewStream(ctx, member.ID(), "/starling/test-secret/1")
			if err == nil {
				s.Reset()
				t.Fatal("outsider opened a stream to a member")
			}
			if tt.notMem && !errors.Is(err, ErrNotMember) && !strings.Contains(err.Error(), "swarm key differs") {
				t.Errorf("outsider's error %q does not say the swarm keys differ", err)
			}
			if n := served.Load(); n != 0 {
				t.Fatalf("member ran a protocol handler %d times for an outsider", n)
			}
			if c := member.Network().Connectedness(outsider.ID()); c == network.Connected {
				t.Fatal("member keeps a connection to an outsider")
			}
		})
	}
}

// TestExclusiveP2PPort: a second host on a TCP port another one listens on
// fails to start, with a message that says so.
func TestExclusiveP2PPort(t *testing.T) {
	t.Parallel()
	first := newTestHost(t, Config{})
	var port string
	for _, a := range first.Addrs() {
		if p, err := a.ValueForProtocol(ma.P_TCP); err == nil {
			port = p
		}
	}
	if port == "" {
		t.Fatalf("first host has no TCP address: %v", first.Addrs())
	}
	h, err := NewHost(Config{ListenAddrs: []string{"/ip4/127.0.0.1/tcp/" + port}}, zaptest.NewLogger(t))
	if err == nil {
		h.Close()
		t.Fatalf("a second host started on TCP port %s", port)
	}
	if !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("error %q does not say the port is in use", err)
	}
}

// TestSupernodeSurvivesTrimming: a host with many more connections than it
// keeps trims down to its budget but never drops a protected supernode.
func TestSupernodeSurvivesTrimming(t *testing.T) {
	t.Parallel()
	key := writeSwarmKey(t, t.TempDir(), "swarm.key")
	const budget = 8
	agent := newTestHost(t, Config{SwarmKeyFile: key, MaxConns: budget, ConnGrace: time.Nanosecond})
	sn := newTestHost(t, Config{SwarmKeyFile: key})
	KeepSupernode(agent, addrInfo(t, sn, isTCP))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := echo(ctx, agent, sn); err != nil {
		t.Fatalf("reach supernode: %v", err)
	}
	for range 3 * budget {
		p := newTestHost(t, Config{SwarmKeyFile: key})
		if err := p.Connect(ctx, addrInfo(t, agent, isTCP)); err != nil {
			t.Fatalf("peer connect: %v", err)
		}
		// Every other peer is worth more than the supernode, so the
		// supernode goes first unless it is protected.
		agent.ConnManager().TagPeer(p.ID(), "test-busy", 10)
	}
	agent.ConnManager().TrimOpenConns(ctx)
	if n := len(agent.Network().Peers()); n > budget {
		t.Fatalf("%d peers after trimming, want <= %d: trimming did not run, the test proves nothing", n, budget)
	}
	if c := agent.Network().Connectedness(sn.ID()); c != network.Connected {
		t.Fatalf("supernode connection trimmed (%v)", c)
	}
}

// TestSupernodeBudget: a host with the supernode's budget keeps more
// connections than libp2p's defaults (192 kept; a system limit scaled from
// memory), and its limits admit SupernodeConns.
func TestSupernodeBudget(t *testing.T) {
	t.Parallel()
	key := writeSwarmKey(t, t.TempDir(), "swarm.key")
	sn := newTestHost(t, Config{SwarmKeyFile: key, MaxConns: SupernodeConns, ConnGrace: time.Nanosecond})
	if hw := sn.ConnManager().(*connmgr.BasicConnMgr).GetInfo().HighWater; hw < 10000 {
		t.Errorf("supernode connection manager keeps %d connections, want >= 10000", hw)
	}
	_ = sn.Network().ResourceManager().ViewSystem(func(s network.ResourceScope) error {
		l := s.(rcmgr.ResourceScopeLimiter).Limit()
		if l.GetConnTotalLimit() < 10000 || l.GetConnLimit(network.DirInbound) < 10000 || l.GetFDLimit() < 10000 {
			t.Errorf("supernode system limits: %d connections, %d inbound, %d fds; want >= 10000 each",
				l.GetConnTotalLimit(), l.GetConnLimit(network.DirInbound), l.GetFDLimit())
		}
		return nil
	})
	const agents = 200 // above libp2p's default high water mark of 192
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, agents)
	hosts := make([]host.Host, agents)
	for i := range hosts {
		hosts[i] = newTestHost(t, Config{SwarmKeyFile: key})
	}
	info := addrInfo(t, sn, isTCP)
	// A few handshakes at a time: 200 at once on a loaded 2-core machine
	// under -race would time out before the limits are ever tested.
	next := make(chan host.Host)
	for range 4 {
		wg.Go(func() {
			for h := range next {
				if err := h.Connect(ctx, info); err != nil {
					errs <- err
				}
			}
		})
	}
	for _, h := range hosts {
		next <- h
	}
	close(next)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("agent connect: %v", err)
	}
	sn.ConnManager().TrimOpenConns(ctx)
	if n := len(sn.Network().Peers()); n != agents {
		t.Fatalf("supernode has %d agents after trimming, want %d", n, agents)
	}
}

// switchResolver resolves every name to one IP, which the test changes.
type switchResolver struct {
	mu sync.Mutex
	ip netip.Addr
}

func (r *switchResolver) set(ip string) {
	r.mu.Lock()
	r.ip = netip.MustParseAddr(ip)
	r.mu.Unlock()
}

func (r *switchResolver) LookupIPAddr(_ context.Context, name string) ([]net.IPAddr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return []net.IPAddr{{IP: r.ip.AsSlice()}}, nil
}

func (r *switchResolver) LookupTXT(context.Context, string) ([]string, error) { return nil, nil }

// TestSupernodeMoves: an agent configured with a /dns4 supernode address
// reaches the supernode again after it restarts on another IP, because the
// name stays in the peerstore and is resolved at each dial.
func TestSupernodeMoves(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeSwarmKey(t, dir, "swarm.key")
	identity := dir + "/supernode.identity"
	rs := &switchResolver{}
	rs.set("127.0.0.2")
	res, err := madns.NewResolver(madns.WithDefaultResolver(rs))
	if err != nil {
		t.Fatal(err)
	}
	// Start on 127.0.0.2 with a port chosen by the kernel, then "move" to
	// 127.0.0.3 on the same port, as a pod keeps its port but not its IP.
	sn, err := NewHost(Config{SwarmKeyFile: key, IdentityFile: identity, ListenAddrs: []string{"/ip4/127.0.0.2/tcp/0"}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	port, err := sn.Addrs()[0].ValueForProtocol(ma.P_TCP)
	if err != nil {
		t.Fatal(err)
	}
	agent := newTestHost(t, Config{SwarmKeyFile: key, DNS: swarm.ResolverFromMaDNS{Resolver: res}})
	info, err := ParsePeerAddr(fmt.Sprintf("/dns4/supernode.starling.test/tcp/%s/p2p/%s", port, sn.ID()))
	if err != nil {
		t.Fatal(err)
	}
	KeepSupernode(agent, info)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sn.SetStreamHandler(echoProto, func(s network.Stream) { s.Close() })
	if err := agent.Connect(ctx, peer.AddrInfo{ID: sn.ID()}); err != nil {
		t.Fatalf("first dial through the name: %v", err)
	}
	gone := make(chan struct{})
	var once sync.Once
	agent.Network().Notify(&network.NotifyBundle{DisconnectedF: func(_ network.Network, c network.Conn) {
		if c.RemotePeer() == sn.ID() {
			once.Do(func() { close(gone) })
		}
	}})
	sn.Close()
	select {
	case <-gone:
	case <-ctx.Done():
		t.Fatal("agent never noticed the supernode left")
	}
	moved, err := NewHost(Config{SwarmKeyFile: key, IdentityFile: identity, ListenAddrs: []string{"/ip4/127.0.0.3/tcp/" + port}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { moved.Close() })
	rs.set("127.0.0.3")
	if err := agent.Connect(ctx, peer.AddrInfo{ID: moved.ID()}); err != nil {
		t.Fatalf("dial after the move: %v", err)
	}
	var kept bool
	for _, a := range agent.Peerstore().Addrs(moved.ID()) {
		kept = kept || strings.HasPrefix(a.String(), "/dns4/")
	}
	if !kept {
		t.Fatalf("configured /dns4 address left the peerstore: %v", agent.Peerstore().Addrs(moved.ID()))
	}
}
