"""HTTP to the servers a test starts itself, all plain HTTP on 127.0.0.1.

httpx builds a TLS context, loading the whole CA bundle, for every top-level call
(`httpx.get`) and every client it makes: about 20 ms of CPU each time. The suite polls its
servers thousands of times, and that was over a third of the test processes' own CPU. One
context, made once, serves every call here; nothing here ever speaks TLS.
"""

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

_TLS = ssl.create_default_context()


def request(method: str, url: str, **options: Any) -> httpx.Response:
    return httpx.request(method, url, verify=_TLS, **options)


def get(url: str, **options: Any) -> httpx.Response:
    return request("GET", url, **options)


def put(url: str, **options: Any) -> httpx.Response:
    return request("PUT", url, **options)


def post(url: str, **options: Any) -> httpx.Response:
    return request("POST", url, **options)


def delete(url: str, **options: Any) -> httpx.Response:
    return request("DELETE", url, **options)


@contextlib.contextmanager
def stream(method: str, url: str, **options: Any) -> Iterator[httpx.Response]:
    with httpx.stream(method, url, verify=_TLS, **options) as response:
        yield response


def client(**options: Any) -> httpx.Client:
    return httpx.Client(verify=_TLS, **options)


def async_client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=_TLS, **options)
