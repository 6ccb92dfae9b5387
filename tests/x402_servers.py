"""A paywalled seller (the x402 package's Flask middleware) and a facilitator stand-in, on loopback.

The facilitator implements ``/supported``, ``/verify`` and ``/settle`` as the
x402 facilitator client calls them, with no chain: it checks each EIP-3009
authorization (the signature recovers to ``from``, payee, amount, validity)
and counts settlements, each nonce once. ``fail_settle`` makes settlements
fail (as an empty wallet would).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from eth_keys import keys
from flask import Flask, request
from werkzeug.serving import make_server
from x402 import x402ResourceServerSync
from x402.http import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    FacilitatorConfig,
    HTTPFacilitatorClientSync,
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.http.middleware.flask import payment_middleware
from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.mechanisms.evm.types import ExactEIP3009Payload
from x402.schemas import PaymentRequired, SettleResponse

NETWORK = "eip155:84532"  # Base Sepolia: USDC is in agentpolicy's asset table
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x" + "5e11e7" * 6 + "abcd"
UNKNOWN_TOKEN = "0x" + "22" * 20
PRICE = 10_000  # $0.01 in USDC base units


class Facilitator:
    """Verifies and settles EIP-3009 authorizations in memory; counts what it settled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.verified = 0
        self.settled: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.fail_settle = False
        self._nonces: set[str] = set()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def check(self, body: dict[str, Any]) -> tuple[str | None, str]:
        """``(None, payer)`` when the authorization is good, else ``(reason, payer)``."""
        payload = body["paymentPayload"]
        req = body["paymentRequirements"]
        auth = ExactEIP3009Payload.from_dict(payload["payload"])
        a = auth.authorization
        digest = hash_eip3009_authorization(
            a, int(req["network"].split(":")[1]), req["asset"], req["extra"]["name"],
            req["extra"]["version"],
        )  # fmt: skip
        sig = bytes.fromhex(auth.signature[2:] if auth.signature else "")
        signer = keys.Signature(sig[:64] + bytes([sig[64] - 27])).recover_public_key_from_msg_hash(
            digest
        )
        if signer.to_checksum_address() != a.from_address:
            return "invalid_signature", a.from_address
        if a.to.lower() != req["payTo"].lower() or int(a.value) != int(req["amount"]):
            return "invalid_payment", a.from_address
        if not int(a.valid_after) <= time.time() < int(a.valid_before):
            return "expired", a.from_address
        if a.nonce in self._nonces:
            return "nonce_used", a.from_address
        return None, a.from_address

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        facilitator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                kind = {"x402Version": 2, "scheme": "exact", "network": NETWORK}
                self.reply({"kinds": [kind], "extensions": [], "signers": {}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with facilitator.lock:
                    reason, payer = facilitator.check(body)
                    if self.path == "/verify":
                        facilitator.verified += 1
                        self.reply({"isValid": reason is None, "invalidReason": reason,
                                    "payer": payer})  # fmt: skip
                        return
                    if reason is None and facilitator.fail_settle:
                        reason = "insufficient_funds"
                    if reason is not None:
                        facilitator.refused.append(reason)
                        self.reply({"success": False, "errorReason": reason, "payer": payer,
                                    "transaction": "", "network": NETWORK})  # fmt: skip
                        return
                    auth = body["paymentPayload"]["payload"]["authorization"]
                    facilitator._nonces.add(auth["nonce"])
                    facilitator.settled.append(auth)
                    tx = "0x" + auth["nonce"][2:]
                self.reply({"success": True, "payer": payer, "transaction": tx,
                            "network": NETWORK, "amount": auth["value"]})  # fmt: skip

        return Handler


def seller_app(facilitator_url: str) -> Flask:
    """A Flask app whose routes cost $0.01 through the x402 package's own middleware."""
    app = Flask("seller")

    @app.get("/report")
    def report() -> dict[str, Any]:
        return {"report": "paid content"}

    @app.get("/broken")
    def broken() -> tuple[dict[str, Any], int]:
        return {"error": "the handler failed"}, 500

    def settle_it_myself() -> Any:
        """Settle the request's payment through the facilitator, as the seller holding it can."""
        payload = decode_payment_signature_header(request.headers[PAYMENT_SIGNATURE_HEADER])
        body = {"paymentPayload": payload.model_dump(by_alias=True),
                "paymentRequirements": payload.accepted.model_dump(by_alias=True)}  # fmt: skip
        with urllib.request.urlopen(urllib.request.Request(
            f"{facilitator_url}/settle", json.dumps(body).encode(),
            {"Content-Type": "application/json"})) as answer:  # fmt: skip
            assert json.loads(answer.read())["success"]
        return payload

    @app.get("/settles-silently")
    def settles_silently() -> tuple[dict[str, Any], int]:
        """A dishonest seller: settles the payment itself, then answers 500 without saying so."""
        settle_it_myself()
        return {"error": "the handler failed"}, 500

    @app.get("/lies")
    def lies() -> tuple[dict[str, Any], int, dict[str, str]]:
        """A lying seller: settles the payment itself, then reports that it failed (402 with a
        failed PAYMENT-RESPONSE), or with ``?refuse=1`` asks for payment again (402 with
        PAYMENT-REQUIRED), as if the payment had been refused."""
        payload = settle_it_myself()
        if request.args.get("refuse"):
            again = PaymentRequired(x402_version=2, accepts=[payload.accepted], error="refused")
            return {}, 402, {PAYMENT_REQUIRED_HEADER: encode_payment_required_header(again)}
        failed = SettleResponse(success=False, error_reason="insufficient_funds", transaction="",
                                network=NETWORK)  # fmt: skip
        return {}, 402, {PAYMENT_RESPONSE_HEADER: encode_payment_response_header(failed)}

    @app.get("/odd-token")
    def odd_token() -> dict[str, Any]:
        return {"report": "never"}

    def accepts(price: Any) -> dict[str, Any]:
        return {"accepts": {"scheme": "exact", "payTo": PAY_TO, "price": price, "network": NETWORK}}

    routes = {
        "GET /report": accepts("$0.01"),
        "GET /broken": accepts("$0.01"),
        "GET /settles-silently": accepts("$0.01"),
        "GET /lies": accepts("$0.01"),
        "GET /odd-token": accepts(
            {"amount": "10000", "asset": UNKNOWN_TOKEN, "extra": {"name": "Odd", "version": "1"}}
        ),
    }
    server = x402ResourceServerSync(
        HTTPFacilitatorClientSync(FacilitatorConfig(url=facilitator_url))
    )
    server.register(NETWORK, ExactEvmServerScheme())
    payment_middleware(app, routes, server)
    return app


@contextmanager
def serving(server: Any) -> Iterator[None]:
    """Run ``server`` (``serve_forever``) on a thread of its own; shut it down and close it after."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def paywall() -> Iterator[tuple[str, Facilitator]]:
    """Start the facilitator and the seller on loopback; yield the seller's URL and the facilitator."""
    facilitator = Facilitator()
    with serving(facilitator.server):  # first: the seller's middleware asks it what it supports
        web = make_server("127.0.0.1", 0, seller_app(facilitator.url), threaded=True)
        with serving(web):
            yield f"http://127.0.0.1:{web.server_port}", facilitator


class CountingSigner:
    """An eth_account key that counts its signatures (to show what was never signed)."""

    def __init__(self) -> None:
        from eth_account import Account
        from x402.mechanisms.evm import EthAccountSigner

        self._inner = EthAccountSigner(Account.create())
        self.address = self._inner.address
        self.signatures = 0
        self.fail = False

    def sign_typed_data(self, *args: Any) -> bytes:
        if self.fail:
            raise RuntimeError("the wallet is locked")
        self.signatures += 1
        return self._inner.sign_typed_data(*args)
