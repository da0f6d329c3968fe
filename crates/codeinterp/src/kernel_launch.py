# Starts a Jupyter kernel for warren-code-interpreter: `python kernel_launch.py MODULE ARGS...`
# runs MODULE as `python -m MODULE ARGS...` would, after making its output paced and bounded.
#
# ipykernel (and kernels built on it, like bash_kernel) publish output on a ZeroMQ PUB socket,
# which drops messages when the subscriber (this server) is behind, and the end of an execution
# (`status: idle`) is one of them. And ipykernel buffers stdout/stderr and publishes the buffer
# every 0.2 s, so a loop that prints as fast as it can makes one message of tens or hundreds of
# MB, which the server must hold whole. So, before the kernel starts:
#
# - the iopub socket gets ZMQ_XPUB_NODROP: at the high-water mark a send blocks instead of
#   dropping, so the server can stop reading while its client is slow (backpressure) and nothing
#   is lost;
# - a Python write is cut into pieces of at most CHUNK characters, and the buffer is published as
#   soon as it holds CHUNK, by the writing thread, which waits for that: messages stay small and
#   code that prints is paced by the server (and through it by the client) instead of filling
#   memory.

import os
import runpy
import sys

CHUNK = 32 * 1024


def pace_output():
    import zmq
    from ipykernel import iostream

    original_init = iostream.IOPubThread.__init__

    def init(self, socket, *args, **kwargs):
        # Still in the main thread, before the IO thread that owns the socket exists.
        socket.setsockopt(zmq.XPUB_NODROP, 1)
        original_init(self, socket, *args, **kwargs)

    iostream.IOPubThread.__init__ = init

    OutStream = iostream.OutStream
    # The chunking uses private attributes of the ipykernel it was written for (6.29).
    if not (hasattr(OutStream, "_rotate_buffers") and hasattr(OutStream, "_flush")):
        print("warren: unknown ipykernel OutStream: output not chunked", file=sys.stderr)
        return
    original_write = OutStream.write

    def buffered(stream):
        with stream._buffer_lock:
            return sum(b.tell() for b in stream._buffers.values())

    def write(self, string):
        if not isinstance(string, str) or getattr(self, "pub_thread", None) is None:
            return original_write(self, string)
        for start in range(0, max(len(string), 1), CHUNK):
            original_write(self, string[start : start + CHUNK])
            if buffered(self) >= CHUNK:
                self.flush()
        return len(string)

    OutStream.write = write


try:
    pace_output()
except Exception as e:  # never keep the kernel from starting
    print(f"warren: output pacing not installed: {e!r}", file=sys.stderr)

module = sys.argv.pop(1)
# As with `python -m`: the working directory, not this file's, comes first on the import path.
sys.path[0] = os.getcwd()
runpy.run_module(module, run_name="__main__", alter_sys=True)
