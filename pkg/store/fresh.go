package store

import (
	"fmt"
	"os"
	"syscall"
)

// fileID tells whether a blob file is still the one a commit wrote: its
// inode and size, and its modification and change times, which any write
// through the filesystem or a replaced file moves.
type fileID struct {
	ino, size    int64
	mtime, ctime syscall.Timespec
}

func idOf(f *os.File) (fileID, error) {
	fi, err := f.Stat()
	if err != nil {
		return fileID{}, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, fmt.Errorf("stat %s: no inode", f.Name())
	}
	return fileID{ino: int64(st.Ino), size: st.Size, mtime: st.Mtim, ctime: st.Ctim}, nil
}

// TakeFresh reports whether f, the complete blob digest as just opened,
// is the file this process committed, with the digest computed then from
// the very bytes it wrote, and not opened through TakeFresh since: such a
// file need not be hashed again for its first serve. It answers true once
// per commit (the answer is used up), and false whenever the file's inode,
// size or times differ from those at the commit. Every later serve hashes
// the file again; the background scrub covers it in between.
func (s *Store) TakeFresh(digest string, f *os.File) bool {
	s.mu.Lock()
	want, ok := s.fresh[digest]
	delete(s.fresh, digest)
	s.mu.Unlock()
	if !ok {
		return false
	}
	got, err := idOf(f)
	return err == nil && got == want
}
