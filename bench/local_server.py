"""`transformers serve` on 127.0.0.1, started and always stopped: the stand-in for vLLM or SGLang that
tests/test_server.py and bench/bench_server.py talk to (an OpenAI-compatible /v1/completions on a CPU). It
loads the model before its HTTP server starts, so /health answers once it is ready; it asks PyPI for updates
at start-up unless HF_HUB_DISABLE_UPDATE_CHECK is set."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

STARTUP_S = 90


@contextlib.contextmanager
def serving(model, port):
    """Serve the model folder on 127.0.0.1:port; yields (url, process) once /health answers; always stopped."""
    env = {**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", str(model),
                                "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"transformers serve did not answer /health within {STARTUP_S} s"
            time.sleep(0.2)
        yield url, process
    finally:
        stop(process)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
