#!/usr/bin/env python3
"""A real S3-compatible server for kvferry's tests: moto's server on a free
loopback port, with IAM authentication on, one user whose keys may do
anything on S3, and one bucket.

It prints one JSON line on stdout once it serves:

    {"endpoint": "http://127.0.0.1:PORT", "bucket": "...", "region": "us-east-1",
     "access_key": "...", "secret_key": "..."}

and serves until stdin closes or it is killed (tests start it, read that
line, and kill it). Requests signed with other keys are refused, as by AWS.
Needs `pip install "moto[server]" boto3` (./scripts/test.sh installs both
into .venv-test).

Usage: s3_test_server.py [--port N] [--bucket NAME]
"""

import argparse
import json
import os
import socket
import sys
import threading

# Authentication starts after the set-up calls below (CreateUser,
# PutUserPolicy, CreateAccessKey): moto counts unauthenticated actions.
SETUP_ACTIONS = 3
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_ACTIONS)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import boto3  # noqa: E402  (after the environment above)
from moto.server import ThreadedMotoServer  # noqa: E402

POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bucket", default="kvferry-test")
    a = p.parse_args()
    port = a.port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boot = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot",
                aws_secret_access_key="boot")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="kvferry")
    iam.put_user_policy(UserName="kvferry", PolicyName="s3", PolicyDocument=json.dumps(POLICY))
    key = iam.create_access_key(UserName="kvferry")["AccessKey"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                      aws_secret_access_key=key["SecretAccessKey"])
    s3.create_bucket(Bucket=a.bucket)
    print(json.dumps({"endpoint": endpoint, "bucket": a.bucket, "region": "us-east-1",
                      "access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}), flush=True)
    done = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
