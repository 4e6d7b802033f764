"""Serve a fastattn attention layer over HTTP with Ray Serve, batching
requests of different lengths, and load-test it.

A request is ``POST /attend`` with JSON ``{"x": [[...], ...]}``: ``L`` tokens
of width ``embed_dim``, any ``L`` from 1 to ``--max-len``. ``@serve.batch``
gathers concurrent requests into one padded ``(B, Lmax, E)`` call of the
layer; ``key_lengths`` masks every request's padding keys and
``query_lengths`` skips its padding rows, so each answer is the layer applied
to that request alone.

    python examples/ray_serve_attention.py --smoke
    python examples/ray_serve_attention.py --requests 2000 --seconds 30 --concurrency 16

The load generator sends a bounded number of requests for a bounded time and
reports latency percentiles and throughput.
"""

import argparse
import json
import os
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import fastattn

# These examples start a one-node Ray cluster on the loopback interface only.
# Ray swaps a loopback node address for the machine's routable one (and then
# listens on every interface) unless multi-node clustering is off; it reads
# that switch when ray is first imported, so it is set here, before anything
# imports ray. On a real cluster, drop it and ray.init(address="auto").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROUTE = "/attend"


def make_layer(embed_dim=64, num_heads=4, seed=0):
    return fastattn.MultiHeadAttention(embed_dim, num_heads, seed=seed)


def attend_batch(layer, inputs):
    """``layer`` applied to each ``(L_i, E)`` array of ``inputs``, through one
    padded call; returns the ``(L_i, E)`` outputs."""
    lengths = np.array([len(x) for x in inputs], dtype=np.int64)
    padded = np.zeros((len(inputs), int(lengths.max()), layer.embed_dim), dtype=layer.dtype)
    for b, x in enumerate(inputs):
        padded[b, : len(x)] = x
    out = layer(padded, key_lengths=lengths, query_lengths=lengths)
    return [out[b, :n] for b, n in enumerate(lengths)]


def build_app(*, embed_dim=64, num_heads=4, seed=0, num_cpus=1, max_batch_size=16,
              batch_wait_timeout_s=0.005):
    """The Serve application: one replica of ``num_cpus`` CPUs whose
    fastattn threads are pinned to as many."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": num_cpus})
    class Attention:
        def __init__(self):
            keep_replica_grpc_on_loopback()
            fastattn.set_num_threads(num_cpus)
            self.layer = make_layer(embed_dim, num_heads, seed)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def attend(self, inputs):
            return attend_batch(self.layer, inputs)

        async def __call__(self, request):
            body = await request.json()
            x = np.asarray(body["x"], dtype=self.layer.dtype)
            if x.ndim != 2 or x.shape[1] != self.layer.embed_dim or not len(x):
                from starlette.responses import JSONResponse
                return JSONResponse({"error": f"x must have shape (L >= 1, {self.layer.embed_dim}), "
                                              f"got {list(x.shape)}"}, status_code=400)
            y = await self.attend(x)
            return {"y": y.tolist()}

    return Attention.bind()


def check_loopback(ray):
    """RuntimeError unless every node of the cluster is 127.0.0.1."""
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        raise RuntimeError(f"the cluster is not on the loopback interface only: {sorted(addresses)} "
                           "(was ray imported before this module?)")


def keep_replica_grpc_on_loopback():
    """Bind this replica's inter-deployment gRPC port to 127.0.0.1.

    Ray Serve opens that port on every interface (``[::]:0``, with no
    option to change it) right after the deployment's constructor returns.
    On a loopback-only cluster every peer reaches the replica at the node
    address, 127.0.0.1, so binding there loses nothing and exposes nothing.
    Does nothing on another cluster, or on a Ray without that internal hook.
    """
    import ray
    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback_only", False):
        return

    def bind_loopback(server, address):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return bind(server, address)

    bind_loopback.loopback_only = True
    replica.add_port_to_grpc_server = bind_loopback


def free_port():
    """A loopback port that is free now, taken below Linux's ephemeral range
    (32768-60999): a port the kernel picked from that range could be handed
    again to one of the processes Ray starts before Serve binds it."""
    rng = np.random.default_rng()
    for port in rng.permutation(np.arange(20000, 32000))[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free loopback port in 20000-32000")


def start(app, *, port, num_cpus=2):
    """A loopback-only Ray cluster and Serve proxy, with ``app`` at
    :data:`ROUTE`; returns the URL."""
    import ray
    from ray import serve
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False)
    check_loopback(ray)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="attention", route_prefix=ROUTE)
    return f"http://127.0.0.1:{port}{ROUTE}"


def post(url, x, timeout=60):
    """The layer output for ``x`` (L, E) from the service, as float32."""
    data = json.dumps({"x": np.asarray(x).tolist()}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return np.asarray(json.loads(resp.read())["y"], dtype=np.float32)


def load_test(url, *, embed_dim, max_len, requests, seconds, concurrency, seed=0):
    """Send at most ``requests`` requests of random lengths 1..max_len from
    ``concurrency`` threads, stopping after ``seconds``; returns a dict of
    counts, latency percentiles (ms) and throughput."""
    rng = np.random.default_rng(seed)
    payloads = [rng.standard_normal((int(n), embed_dim), dtype=np.float32)
                for n in rng.integers(1, max_len + 1, requests)]
    deadline = time.perf_counter() + seconds
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def one(x):
        if time.perf_counter() > deadline:
            return
        t0 = time.perf_counter()
        try:
            post(url, x)
        except Exception as exc:  # counted and reported, not fatal to the run
            with lock:
                errors.append(repr(exc))
            return
        with lock:
            latencies.append(time.perf_counter() - t0)
            tokens.append(len(x))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, payloads))
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return {"requests": len(latencies), "errors": len(errors), "seconds": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--smoke", action="store_true", help="a short run that also checks answers (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.seconds, args.max_len = 64, 20.0, 32

    import ray
    from ray import serve
    try:
        url = start(build_app(embed_dim=args.embed_dim, num_heads=args.num_heads),
                    port=args.port or free_port())
        if args.smoke:  # the service's answer is the layer's own
            layer = make_layer(args.embed_dim, args.num_heads)
            x = np.random.default_rng(1).standard_normal((5, args.embed_dim), dtype=np.float32)
            np.testing.assert_allclose(post(url, x), layer(x[None])[0], rtol=1e-5, atol=1e-6)
        stats = load_test(url, embed_dim=args.embed_dim, max_len=args.max_len, requests=args.requests,
                          seconds=args.seconds, concurrency=args.concurrency)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{stats['requests']} requests ({stats['errors']} errors) in {stats['seconds']:.1f} s: "
          f"{stats['requests_per_s']:.1f} req/s, {stats['tokens_per_s']:.0f} tokens/s; latency "
          f"p50 {stats['p50_ms']:.1f} ms, p90 {stats['p90_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms")
    if stats["errors"] or not stats["requests"]:
        raise SystemExit("the load test had errors or no answers")


if __name__ == "__main__":
    main()
