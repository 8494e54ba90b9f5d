"""The server's pieces without a server: address checks for image URLs, the prefix index, request parsing."""

from __future__ import annotations

import pytest

from dsvl import openai_api as api
from dsvl.prefix_index import PrefixIndex
from dsvl.safe_fetch import FetchError, fetch, is_public


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.1", "10.0.0.5", "172.16.3.4", "192.168.1.1",
                                     "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "fe80::1%eth0",
                                     "fc00::1", "::ffff:127.0.0.1", "::ffff:10.1.2.3", "240.0.0.1"])
def test_private_and_special_addresses_are_not_public(address):
    assert not is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_internet_addresses_are_public(address):
    assert is_public(address)


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png", "http://localhost:8000/", "https://[::1]/x",
                                 "http://user:pw@example.com/a.png", "file:///etc/passwd", "gopher://x/",
                                 "http://0x7f000001/", "http://2130706433/"])
def test_fetch_refuses_without_connecting(url):
    with pytest.raises(FetchError):
        fetch(url, timeout=1)


def test_prefix_index_maps_extensions_to_the_recorded_session():
    index = PrefixIndex(capacity=3)
    a = ["sys", "u1"]
    sid, known = index.session_for(a)
    assert known == 0
    index.record(a, sid)
    index.record([*a, "answer1"], sid)
    assert index.session_for([*a, "answer1", "u2"]) == (sid, 3)  # a follow-up
    assert index.session_for(a) == (sid, 2)  # a retry of the same request
    other, known = index.session_for(["sys", "another question"])
    assert other != sid and known == 0
    assert index.session_for(["u1"])[1] == 0  # order matters: a message alone is not a prefix match
    for i in range(3):
        index.record([f"x{i}"], f"s{i}")
    assert len(index) == 3 and index.session_for([*a, "answer1", "u2"])[1] == 0  # bounded, oldest out


def _prepare(body: dict, **limits):
    return api.prepare(api.ChatRequest.model_validate(body), api.Limits(max_context_tokens=4096, **limits),
                       fetch=lambda url: b"fetched", model_name="m")


def test_requests_become_engine_messages_and_parameters():
    p = _prepare({"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "What?"},
                                                            {"type": "image_url", "image_url": "data:image/png;base64,aGk="}]}],
                  "max_completion_tokens": 7, "stop": "END", "repetition_penalty": 1.3, "top_p": 0.5, "seed": 3})
    assert p.messages[1]["content"][1]["image"] == b"hi"
    assert p.params == {"max_new_tokens": 7, "temperature": 0.1, "top_p": 0.5, "top_k": 0,
                        "repetition_penalty": 1.3, "seed": 3, "stop": ("User:", "END")}
    same_text_other_image = _prepare({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What?"},
                                     {"type": "image_url", "image_url": "data:image/png;base64,aG8="}]}]})
    assert p.digests[0] == same_text_other_image.digests[0] and p.digests[1] != same_text_other_image.digests[1]


def test_image_urls_need_the_flag_and_text_has_a_bound():
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}]}
    with pytest.raises(api.ApiError, match="does not download images"):
        _prepare(body)
    assert _prepare(body, allow_image_urls=True).messages[0]["content"][0]["image"] == b"fetched"
    with pytest.raises(api.ApiError, match="characters of text"):
        _prepare({"messages": [{"role": "user", "content": "a" * (32 * 4096 + 1)}]})


def test_gate_serves_in_order_refuses_beyond_the_line_and_lets_leavers_go():
    import asyncio

    from dsvl.serve_queue import Busy, Gate

    async def scenario():
        gate, order = Gate(max_waiting=2), []
        stay, leave = asyncio.Event(), asyncio.Event()
        assert await gate.acquire(stay)  # free: taken at once

        async def wait(name, gone):
            if await gate.acquire(gone):
                order.append(name)
                gate.release()

        a = asyncio.create_task(wait("a", stay))
        b = asyncio.create_task(wait("b", leave))
        await asyncio.sleep(0)
        assert gate.waiting == 2
        with pytest.raises(Busy):
            await gate.acquire(stay)
        leave.set()  # b's client goes away while waiting: it leaves the line
        await b
        assert gate.waiting == 1
        gate.release()  # the holder finishes: a gets its turn
        await a
        assert order == ["a"] and not gate.busy

    asyncio.run(scenario())
