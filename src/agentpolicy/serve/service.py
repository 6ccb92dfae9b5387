"""What the routes of ``agentpolicy serve`` share: the engine, tokens, callers, CSRF, cards.

:class:`Service` holds the engine (and an
:class:`~agentpolicy.AsyncPolicyEngine` over it for the pages), the token
store, the metrics and the MCP transport; it finds out who a request comes
from (a bearer header, or a browser session) and builds the approval cards
the pages show.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import attrs
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from agentpolicy._checks import person, same_secret
from agentpolicy.aio import AsyncPolicyEngine
from agentpolicy.engine import PolicyEngine
from agentpolicy.errors import NotFoundError
from agentpolicy.records import Approval
from agentpolicy.serve import pages
from agentpolicy.serve.mcp_http import ToolServers, build_sdk_server, new_session_manager
from agentpolicy.serve.metrics import Metrics
from agentpolicy.serve.tokens import AccessToken, SignedIn, TokenRejected, TokenStore, token_hash
from agentpolicy.storage import AsyncStorage
from agentpolicy.views import budget_seen_by

__all__ = [
    "BUDGET_ROLES",
    "b64",
    "PAGE_ROLES",
    "Caller",
    "Denied",
    "ServeOptions",
    "Service",
    "Unauthorized",
    "html",
    "local_path",
    "loggable",
    "shows",
    "wants_html",
]

PAGE_ROLES = ("admin", "approver")
"""The roles that may see the approvals pages."""
BUDGET_ROLES = ("admin", "agent")
"""The roles that may see the budget pages."""


def _nobody(agent_id: str) -> bool:
    """The binding of a one-time link: it covers no budget above the approval's agent."""
    return False


@attrs.frozen
class ServeOptions:
    """How the service runs (the ``agentpolicy serve`` flags; see ``docs/serve.md``).

    ``secure_cookies``: cookies carry ``Secure`` and the ``__Host-`` prefix
    (TLS here or at a proxy in front). ``hsts``: send
    ``Strict-Transport-Security`` (TLS here). ``loopback_hosts``: accept only
    loopback names in the ``Host`` header (a loopback bind: this blocks DNS
    rebinding). ``session_ttl``: how long a sign-in lasts. ``refresh_seconds``:
    how often the approvals list asks for changes. ``sweep_seconds``: how
    often due reservations and approvals are expired.
    """

    secure_cookies: bool = False
    hsts: bool = False
    loopback_hosts: bool = True
    session_ttl: timedelta = timedelta(hours=12)
    refresh_seconds: int = 5
    sweep_seconds: float = 30.0


class Denied(Exception):  # noqa: N818 - an answer, not a bug
    """A page request that gets an error page (or a redirect to sign in).

    A JSON client gets ``{"error": {"code", "message"}}`` instead, ``code``
    (when not given) by the status (:data:`agentpolicy.serve.errors.HTTP_CODES`).
    """

    def __init__(
        self,
        status: int,
        heading: str,
        message: str,
        *,
        signin: bool = False,
        code: str | None = None,
        then: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.heading = heading
        self.message = message
        self.signin = signin
        self.code = code
        self.then = then
        """Where a browser sent to sign in goes after (``None``: the page it asked for)."""


@attrs.frozen
class Caller:
    """Who asks: a token, and the browser session it came in (``None``: a bearer header)."""

    token: AccessToken
    session: SignedIn | None = None

    @property
    def voter(self) -> str | None:
        """The approver this caller votes as on the pages, if any."""
        return self.token.approver if self.token.role in PAGE_ROLES else None


def vote_binding(session_key: str, approval_id: str) -> str:
    """What a signed-in vote form's CSRF token is bound to: the session and that one approval."""
    return f"v:{session_key}:{approval_id}"


def b64(raw: bytes) -> str:
    """Bytes as unpadded base64url."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Service:
    """What the routes share: the engine (sync and async), tokens, metrics, options."""

    def __init__(
        self,
        engine: PolicyEngine,
        options: ServeOptions,
        async_storage: AsyncStorage | None = None,
    ) -> None:
        self.engine = engine
        self.options = options
        self.async_storage = async_storage
        self.aengine = AsyncPolicyEngine.from_engine(engine, async_storage=async_storage)
        self.tokens = TokenStore(engine.storage, engine.clock)
        self.metrics = Metrics()
        self.servers = ToolServers(engine)
        self.sdk = build_sdk_server(self.servers, self.metrics)
        self.manager = new_session_manager(self.sdk)
        self._csrf: bytes | None = None
        prefix = "__Host-" if options.secure_cookies else ""
        self.session_cookie = prefix + "agentpolicy_session"
        self.nonce_cookie = prefix + "agentpolicy_csrf"

    # -- helpers --------------------------------------------------------------------------

    async def sync(self, call: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call (a token check, a store read) on a worker thread."""
        return await anyio.to_thread.run_sync(call, *args)

    async def csrf(self, binding: str) -> str:
        """The CSRF token of a form bound to ``binding`` (a session, a link, a sign-in nonce)."""
        if self._csrf is None:
            self._csrf = await self.sync(self.tokens.csrf_key)
        return b64(hmac.new(self._csrf, binding.encode(), hashlib.sha256).digest())

    @staticmethod
    def check_origin(request: Request) -> None:
        """Refuse a POST whose ``Origin`` is another site, or whose ``Sec-Fetch-Site`` says so."""
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise Denied(403, "Refused", "This form was sent from another site.")
        site = request.headers.get("sec-fetch-site")
        if site not in (None, "same-origin", "none"):
            raise Denied(403, "Refused", "This form was sent from another site.")

    async def check_csrf(self, request: Request, binding: str, presented: object) -> None:
        """Refuse a POST from another site, or whose CSRF token is not the one ``binding`` gives."""
        self.check_origin(request)
        expected = await self.csrf(binding)
        if not same_secret(presented, expected):  # anything that is not it, a non-ASCII one too
            raise Denied(403, "Refused", "This form has expired: reload the page and try again.")

    def cookie(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        """Set one of our cookies: HttpOnly, SameSite=Strict, Secure when served over TLS."""
        response.set_cookie(
            name, value, max_age=max_age, path="/", httponly=True,
            secure=self.options.secure_cookies, samesite="strict",
        )  # fmt: skip

    def forget(self, response: Response, name: str) -> None:
        """Delete a cookie of ours."""
        response.delete_cookie(name, path="/", secure=self.options.secure_cookies, httponly=True,
                               samesite="strict")  # fmt: skip

    async def caller(self, request: Request, *, bearer: bool = True) -> Caller | None:
        """The bearer token (if a header is sent) or the browser session, or ``None``."""
        header = request.headers.get("authorization")
        if bearer and header is not None:
            scheme, _, presented = header.partition(" ")
            try:
                token = await self.sync(
                    self.tokens.verify, presented.strip() if scheme.lower() == "bearer" else ""
                )
            except TokenRejected as rejected:
                raise Unauthorized(rejected.reason) from None
            return Caller(token)
        secret = request.cookies.get(self.session_cookie)
        if not secret:
            return None
        try:
            session = await self.sync(self.tokens.session, secret)
        except TokenRejected:
            return None
        return Caller(session.token, session)

    async def require(
        self, request: Request, roles: tuple[str, ...], *, signin: bool = True
    ) -> Caller:
        """The caller, who must have one of ``roles`` (else 401, or 403).

        ``signin=False``: a browser that is not signed in gets the 401 itself,
        never the redirect to ``/signin`` (a script's request, not a page).
        """
        caller = await self.caller(request)
        if caller is None:
            raise Denied(401, "Sign in", "Sign in to see this page.", signin=signin)
        if caller.token.role not in roles:
            role = caller.token.role
            raise Denied(403, "Not for this token",
                          f"{_article(role)} {role} token may not see this page.")  # fmt: skip
        return caller

    async def page_values(self, caller: Caller | None) -> dict[str, Any]:
        """What the page header shows: who is signed in, the links, the sign-out form."""
        if caller is None:
            return {"who": None}
        t = caller.token
        who = t.approver or (t.agent_id and f"agent {t.agent_id}") or f"{t.role} ({t.binding})"
        return {
            "who": who,
            "nav_approvals": t.role in PAGE_ROLES,
            "nav_agents": t.role in BUDGET_ROLES,
            "signout_csrf": None if caller.session is None
            else await self.csrf("s:" + caller.session.key),
        }  # fmt: skip

    # -- approvals --------------------------------------------------------------------------

    async def card(
        self, approval: Approval, caller: Caller | None, link: tuple[str, str, str] | None
    ) -> dict[str, Any]:
        """One approval card, with a vote form for a link (token, approver, decision) or a voter."""
        now = self.engine.clock()
        budget_views: list[dict[str, Any]] = []
        policies: dict[str, Any] = {}
        try:
            # as the budget page shows it: no scope groups of a budget above that the caller's
            # token does not cover (they name whom other agents below it paid); a one-time link
            # is bound to nobody, so it shows none of them
            may_see = _nobody if caller is None else caller.token.may_see
            budget = budget_seen_by(await self.aengine.budget(approval.agent_id), may_see)
            budget_views = pages.budget_views(budget, now)
            found = await self.aengine.get_policy_version(approval.agent_id,
                                                          approval.policy_version)  # fmt: skip
            policies[approval.agent_id] = (found.policy, found.version)
            for above in budget.ancestors:
                stored = await self.aengine.get_policy(above.agent_id)
                if stored is not None:
                    policies[above.agent_id] = (stored.policy, stored.version)
        except NotFoundError:  # the agent's policy is gone: show the approval all the same
            pass
        link_agent = caller is not None and caller.token.role == "admin" and \
            caller.token.may_see(approval.agent_id)  # fmt: skip
        view = pages.approval_view(
            approval, now, rules=pages.rule_lines(approval, policies), budgets=budget_views,
            link_agent=link_agent,
        )  # fmt: skip
        view["vote"] = await self.vote_form(approval, caller, link)
        return view

    async def vote_form(
        self, approval: Approval, caller: Caller | None, link: tuple[str, str, str] | None
    ) -> dict[str, Any] | None:
        """The vote form of a card: for a link, for a signed-in voter, or why none."""
        if approval.status.value != "pending":
            return None
        if link is not None:
            token, approver, decision = link
            if any(person(v.approver) == person(approver) for v in approval.votes):
                return {"blocked": f"{approver} has voted on this approval already."}
            if await self._signs(approval, approver):  # a key registered since the link was made
                return {"blocked": (
                    f"{approver}'s vote must be signed with {approver}'s key, so this link "
                    f"no longer votes: run agentpolicy approvals approve {approval.id} --as "
                    f"{approver} --key KEY_FILE (or approvals deny) where the key is."
                )}  # fmt: skip
            return {
                "voter": approver,
                "link": token,
                "only": decision,  # a link casts the decision it was made for, and no other
                "csrf": await self.csrf("l:" + token_hash(token)),
                "blocked": None,
            }
        if caller is None or caller.session is None or caller.voter is None:
            return None
        voter = caller.voter
        folded = person(voter)
        if folded not in {person(a) for a in approval.every_approver}:
            return None
        if any(person(v.approver) == folded for v in approval.votes):
            return {"blocked": f"You ({voter}) voted on this approval already."}
        if await self._signs(approval, voter):
            return {"blocked": (
                f"{voter}'s vote must be signed with {voter}'s key, which this service never "
                f"holds: run agentpolicy approvals approve {approval.id} --as {voter} "
                "--key KEY_FILE (or approvals deny) where the key is.")}  # fmt: skip
        csrf = await self.csrf(vote_binding(caller.session.key, approval.id))
        return {"voter": voter, "link": None, "only": None, "csrf": csrf, "blocked": None}

    async def _signs(self, approval: Approval, approver: str) -> bool:
        """Whether ``approver``'s vote must be signed: a registered key, or signed votes only."""
        if approval.require_signed_votes:
            return True
        registered = await self.aengine.get_approver(approver)
        return registered is not None and registered.current is not None

    async def visible_approvals(self, caller: Caller) -> list[Approval]:
        """The pending approvals this caller may see (an approver: those it may vote on)."""
        pending = await self.aengine.list_approvals(expire=False)
        return [a for a in pending if shows(caller, a)]


def shows(caller: Caller, approval: Approval) -> bool:
    """Whether ``caller`` may see ``approval``: its agent's, and (an approver) one naming it."""
    token = caller.token
    if not token.may_see(approval.agent_id):
        return False
    if token.role != "approver":
        return True
    me = person(token.approver or "")
    return me in {person(x) for x in approval.every_approver}


class Unauthorized(Exception):  # noqa: N818 - an answer, not a bug
    """A bearer header whose token is not valid (answered 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def wants_html(request: Request) -> bool:
    """Whether the request comes from a browser (it accepts HTML)."""
    return "text/html" in request.headers.get("accept", "")


def local_path(target: str | None, default: str) -> str:
    """A path on this site to go to after signing in (anything else: ``default``)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return default


def loggable(text: str) -> str:
    """``text`` for the service's log: every character that is not printable escaped.

    A request's path is percent-decoded: written as it is, a caller's ``%1B``
    or ``%0D`` would put terminal escapes or a line of its own making into
    the log that records who voted.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A page as a response."""
    return HTMLResponse(text, status_code=status, headers=headers)


def _article(word: str) -> str:
    """``An`` before a vowel (an admin, an agent, an approver), else ``A``."""
    return "An" if word[:1].lower() in "aeiou" else "A"
