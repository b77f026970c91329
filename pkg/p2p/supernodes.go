package p2p

import (
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
)

// supernodeTag marks protected supernode connections in the connection manager.
const supernodeTag = "starling-supernode"

// KeepSupernode makes h treat info as one of its configured supernodes:
// the configured addresses never expire from the peerstore (a /dns4 or
// /dns address stays as a name and is resolved again at every dial, so a
// supernode pod that moves to another IP is found there), and connections
// to it are protected from the connection manager's trimming, so that a
// busy agent never cuts its own tracker off.
func KeepSupernode(h host.Host, info peer.AddrInfo) {
	h.Peerstore().AddAddrs(info.ID, info.Addrs, peerstore.PermanentAddrTTL)
	h.ConnManager().Protect(info.ID, supernodeTag)
}
