#!/bin/sh
# Starts "$@" (a pytest-xdist worker: `make test` names this script as the workers' python)
# with a /dev/shm of its own, where this user may make mount namespaces (root), else as is.
#
# mosaicml-streaming numbers the shared memory of every dataset on a machine in one
# sequence (/dev/shm/000001_locals, ...), and each rank of a run works out its number by
# itself: a segment of another run removed between two ranks' looks gives them different
# numbers, and the run fails to start ("prefix=1 was not registered by local leader").
# One test at a time never meets another run; two workers would, so each gets its own
# /dev/shm, as if on a machine of its own.
if unshare --mount --propagation private true 2>/dev/null; then
    exec unshare --mount --propagation private \
        sh -c 'mount -t tmpfs tmpfs /dev/shm && exec "$@"' sh "$@"
fi
exec "$@"
