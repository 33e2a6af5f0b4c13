#!/usr/bin/env python3
"""The reference for `kvferry bench storage --backend obj`: boto3 doing the
same requests with the same concurrency. A batch is `--batch-size` objects of
`--block-size` bytes, PUT (or GET) by `--concurrency` threads at once; one
iteration moves the whole batch. Prints one line:

    boto3 WRITE 4M x 64: 0.412 GB/s, 9.8 ms per object (median of 5 iterations)

Usage: obj_bench_boto3.py --endpoint URL --bucket B --access-key K --secret-key S
       [--op write|read] [--block-size 4M] [--batch-size 64] [--concurrency 16] [--iters 5]
"""

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--access-key", required=True)
    p.add_argument("--secret-key", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--op", choices=["write", "read"], default="write")
    p.add_argument("--block-size", default="4M")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    block = size(a.block_size)
    cfg = Config(max_pool_connections=a.concurrency, retries={"max_attempts": 3})
    s3 = boto3.client("s3", endpoint_url=a.endpoint, region_name=a.region, aws_access_key_id=a.access_key,
                      aws_secret_access_key=a.secret_key, config=cfg)
    body = bytes(range(256)) * (block // 256) + bytes(block % 256)
    keys = [f"boto3-bench/{block}x{a.batch_size}/{i}" for i in range(a.batch_size)]

    def put(k):
        s3.put_object(Bucket=a.bucket, Key=k, Body=body)

    def get(k):
        got = s3.get_object(Bucket=a.bucket, Key=k)["Body"].read()
        assert len(got) == block, f"{k}: {len(got)} bytes"

    with ThreadPoolExecutor(a.concurrency) as pool:
        if a.op == "read":
            list(pool.map(put, keys))
        fn = put if a.op == "write" else get
        list(pool.map(fn, keys))  # warm-up: connections open
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            list(pool.map(fn, keys))
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    gbs = block * a.batch_size / med / 1e9
    print(f"boto3 {a.op.upper()} {a.block_size} x {a.batch_size}: {gbs:.3f} GB/s, "
          f"{med / a.batch_size * 1e3:.2f} ms per object (median of {a.iters} iterations)", flush=True)


if __name__ == "__main__":
    main()
