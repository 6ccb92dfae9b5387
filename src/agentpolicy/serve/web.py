"""The pages of ``agentpolicy serve``: approvals, one-time links, votes, budgets, sign-in.

Each handler is a method of :class:`Pages`; :meth:`Pages.wrap` turns a
refusal into an error page (or, for a browser that is not signed in, a
redirect to ``/signin``), a bad bearer token into a 401, and an
unreachable store into a 503; a JSON client gets each of them as the
structured error of :mod:`agentpolicy.serve.errors` instead of a page. A
GET never changes anything; every vote, sign-in and sign-out is a POST
with a CSRF token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from agentpolicy.errors import (
    ErrorCode,
    ForbiddenError,
    NotFoundError,
    PolicyError,
    PolicyValidationError,
    StorageUnavailableError,
)
from agentpolicy.records import Approval
from agentpolicy.serve import pages
from agentpolicy.serve.errors import error_json, error_page, wants_json
from agentpolicy.serve.limits import FORM_BODY_LIMIT, FORM_FIELDS
from agentpolicy.serve.mcp_http import challenge
from agentpolicy.serve.service import (
    BUDGET_ROLES,
    PAGE_ROLES,
    Caller,
    Denied,
    Service,
    Unauthorized,
    b64,
    html,
    local_path,
    loggable,
    shows,
    vote_binding,
    wants_html,
)
from agentpolicy.serve.tokens import AccessToken, TokenRejected, token_hash
from agentpolicy.views import budget_seen_by

__all__ = ["MAX_CARDS", "Pages"]

log = logging.getLogger("agentpolicy.serve")

MAX_CARDS = 100
"""The most approvals one page shows (oldest first); the rest wait for these."""


async def _form(request: Request) -> FormData:
    """The urlencoded form of a POST: a few small fields, never a file (see ``limits``)."""
    try:
        return await request.form(
            max_files=0, max_fields=FORM_FIELDS, max_part_size=FORM_BODY_LIMIT
        )
    except HTTPException as bad:  # too many fields, a field too long: not a form of ours
        raise Denied(400, "Refused", f"This is not a form of this service: {bad.detail}") from None


def _unknown_outcome(err: StorageUnavailableError) -> bool:
    """Whether a change may have been recorded: the store says so, or does not say it was not.

    Every store says "unknown" when a commit's answer was lost, and "nothing
    was allowed or changed" (or "allowed nothing") when it surely was not;
    an error that says neither is taken as unknown.
    """
    said = err.message
    return "unknown" in said or not ("nothing was" in said or "allowed nothing" in said)


def _status(err: PolicyError) -> int:
    """The HTTP status of a page the engine refused: bad input, not found, forbidden, else 409."""
    for kind, status in ((PolicyValidationError, 400), (NotFoundError, 404), (ForbiddenError, 403)):
        if isinstance(err, kind):
            return status
    return 409


class Pages:
    """The page handlers, on one :class:`~agentpolicy.serve.service.Service`."""

    def __init__(self, service: Service) -> None:
        self.s = service

    async def wrap(
        self, request: Request, handler: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Run a page handler; turn its refusals into error pages, 401s and sign-in redirects."""
        json = wants_json(request.scope)
        try:
            return await handler(request)
        except Unauthorized as bad:  # a bearer header: an API caller, answered JSON
            log.info("refused a %s token on %s", bad.reason, loggable(request.url.path))
            return error_json(401, "the token is not valid (unknown, revoked or expired)",
                              headers={"WWW-Authenticate": challenge("invalid_token")})  # fmt: skip
        except Denied as denied:
            if denied.status == 401 and denied.signin and wants_html(request) and not json:
                then = denied.then
                if then is None and request.method in ("GET", "HEAD"):  # back to this page
                    query = request.url.query
                    then = request.url.path + (f"?{query}" if query else "")
                # a POST's own path is no page to come back to (GET /approvals/vote is a 405)
                target = quote(then or "/approvals")
                return RedirectResponse(f"/signin?next={target}", status_code=303)
            headers = {"WWW-Authenticate": challenge()} if denied.status == 401 else None
            if json:
                return error_json(denied.status, denied.message, denied.code, headers=headers)
            return error_page(denied.status, denied.message, denied.heading,
                              signin=denied.signin, headers=headers)  # fmt: skip
        except StorageUnavailableError as err:
            if json:
                return error_json(503, f"The store is unavailable: {err.message}", err.code)
            return error_page(503, f"The store is unavailable: {err.message}", "Unavailable")
        except PolicyError as err:  # any other refusal of the engine's: a page, never a 500
            status = _status(err)
            if json:
                return error_json(status, err.message, err.code, path=err.path)
            return error_page(status, f"{err.message} ({err.code}).", "Refused")

    async def approvals(self, request: Request) -> Response:
        """``GET /approvals``: the caller's pending approvals (``?fragment=1``: the list only).

        The list alone is what ``app.js`` polls: signed out, it is a plain 401
        (the script then says the session ended), never the redirect to
        ``/signin``, which ``fetch`` would follow and put the sign-in page
        inside the list.
        """
        fragment = bool(request.query_params.get("fragment"))
        caller = await self.s.require(request, PAGE_ROLES, signin=not fragment)
        shown = await self.s.visible_approvals(caller)
        cards = [await self.s.card(a, caller, None) for a in shown[:MAX_CARDS]]
        more = max(0, len(shown) - MAX_CARDS)
        n = len(shown)
        summary = f"{n} pending approval{'s' if n != 1 else ''} for you" + \
            f", as of {pages.when(self.s.engine.clock())}."  # fmt: skip
        if fragment:
            return html(pages.render("_list.html", approvals=cards, more=more),
                         headers={"X-Approvals-Summary": summary})  # fmt: skip
        values = await self.s.page_values(caller)
        return html(pages.render(
            "approvals.html", title="Pending approvals", approvals=cards, more=more,
            summary=summary, every=self.s.options.refresh_seconds, **values,
        ))  # fmt: skip

    async def link(self, request: Request) -> Response:
        """``GET /approvals/link?t=TOKEN``: the approval a one-time link names, to decide."""
        token = request.query_params.get("t")
        if not token:
            raise Denied(400, "This link does not work", "The link has no token.")
        return await self._by_link(token, None)

    async def approval(self, request: Request) -> Response:
        """``GET /approvals/{id}``: one approval, by a one-time link (``?t=``) or signed in."""
        approval_id = request.path_params["approval_id"]
        token = request.query_params.get("t")
        if token:
            return await self._by_link(token, approval_id)
        caller = await self.s.require(request, PAGE_ROLES)
        shown = await self._shown(caller, approval_id)
        card = await self.s.card(shown, caller, None)
        return html(pages.render(
            "approval.html", title=f"Approval for {shown.agent_id}",
            heading=f"{shown.agent_id} asks to pay {shown.amount.human()}", intro=None,
            approval=card, **await self.s.page_values(caller),
        ))  # fmt: skip

    async def _by_link(self, token: str, approval_id: str | None) -> Response:
        """The page of a one-time link (for ``approval_id`` when the URL names one)."""
        try:
            link, found = await self.s.aengine.inspect_link(token)
        except PolicyError as err:
            raise Denied(403, "This link does not work",
                          "This approval link is not valid: it was altered, or the service's "
                          f"link secret changed ({err.code}).") from None  # fmt: skip
        if approval_id is not None and link.approval_id != approval_id:
            raise Denied(403, "This link does not work",
                          "This link is for another approval.")  # fmt: skip
        card = await self.s.card(found, None, (token, link.approver, link.decision))
        page = html(pages.render(
            "approval.html", title=f"Approval for {found.agent_id}",
            heading=f"{found.agent_id} asks to pay {found.amount.human()}",
            intro=f"You decide as {link.approver}, with the one-time link sent to you to "
            f"{link.decision} this payment.",
            approval=card, who=None, referrer="origin",
        ))  # fmt: skip
        # the token stays out of every Referer, our own form's POST included (the page's
        # <meta name="referrer"> says the same: a meta would otherwise override the header)
        page.headers["Referrer-Policy"] = "origin"
        return page

    async def _shown(self, caller: Caller, approval_id: str) -> Approval:
        """The approval, if the caller may see it; else the same 404 as for none at all.

        The answer never tells an approval the caller may not see from one
        that does not exist (as the MCP tools do).
        """
        hidden = Denied(
            404,
            "Not found",
            f"There is no approval {approval_id} for you.",
            code=ErrorCode.APPROVAL_NOT_FOUND,
        )
        try:
            found = await self.s.aengine.get_approval(approval_id)
        except (NotFoundError, PolicyValidationError):
            raise hidden from None
        if not shows(caller, found):  # another organisation's, or (an approver) not naming it
            raise hidden
        return found

    async def vote(self, request: Request) -> Response:
        """``POST /approvals/vote``: approve or deny, by a link or signed in as an approver.

        The approval is a form field (never a part of the path, which a
        browser would resolve), and a signed-in voter's CSRF token is bound to
        it: a form can only vote on the approval it was made for.
        """
        form = await _form(request)
        approval_id = form.get("approval")
        if not isinstance(approval_id, str) or not approval_id:
            raise Denied(400, "Refused", "The form names no approval.")
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            raise Denied(400, "Refused", "Choose Approve or Deny.")
        raw = form.get("comment")
        comment = raw.strip() if isinstance(raw, str) and raw.strip() else None
        link = form.get("t")
        caller: Caller | None = None
        try:
            if isinstance(link, str) and link:
                await self.s.check_csrf(request, "l:" + token_hash(link), form.get("csrf"))
                voter, via = await self._link_voter(link, approval_id)
                done = await self._redeem(link, approval_id, str(decision), comment)
            else:
                caller = await self._session_voter(request, form.get("csrf"), approval_id)
                voter, via = caller.voter or "", f"a session of token {caller.token.id}"
                done = await self.s.aengine.decide(approval_id, voter, str(decision), comment)
        except StorageUnavailableError as err:  # 503, and never "nothing was changed" unless so
            return await self._store_failed(err, approval_id, caller, wants_json(request.scope))
        except PolicyError as err:
            status = {ErrorCode.APPROVER_NOT_AUTHORIZED: 403, ErrorCode.APPROVAL_NOT_FOUND: 404,
                      ErrorCode.INVALID_INPUT: 400}.get(err.code, 409)  # fmt: skip
            if wants_json(request.scope):
                return error_json(status, f"{err.message}; the vote was not counted and nothing "
                                  "was changed", err.code, path=err.path)  # fmt: skip
            page = pages.render(
                "result.html", title="Not counted", heading="Your vote was not counted",
                message=f"{err.message} ({err.code}). Nothing was changed.", tone="bad",
                approval=None, back="/approvals" if caller else None,
                **await self.s.page_values(caller),
            )  # fmt: skip
            return html(page, status)
        log.info("%s on %s as %s via %s", decision, approval_id, voter, via)
        verb = "approved" if decision == "approve" else "denied"
        state = {"approved": "It is approved: the agent may pay now.",
                 "denied": "It is denied: the held amount is back in the budget.",
                 }.get(done.status.value, "It waits for more votes.")  # fmt: skip
        try:
            card: dict[str, Any] | None = await self.s.card(done, caller, None)
        except StorageUnavailableError:  # the vote counted: say so, without the card
            card = None
        page = pages.render(
            "result.html", title="Vote counted", heading=f"You {verb} this payment",
            message=f"{voter} {verb} {done.amount.human()} to {done.request.recipient} for "
            f"{done.agent_id}. {state}", tone="good", approval=card,
            back="/approvals" if caller else None, **await self.s.page_values(caller),
        )  # fmt: skip
        return html(page)

    async def _store_failed(
        self, err: StorageUnavailableError, approval_id: str, caller: Caller | None, json: bool
    ) -> Response:
        """The page of a vote the store failed: unavailable, or (an answer lost) unknown."""
        if _unknown_outcome(err):
            log.warning("a vote on %s may or may not be recorded: %s", approval_id, err.message)
            heading = "Your vote may not have been counted"
            message = (f"The store did not confirm the vote: {err.message} ({err.code}). "
                       "Whether it was recorded is unknown: open the approval again (your "
                       "link, or the approvals list) and reload it to see whether your vote is "
                       "there before voting again.")  # fmt: skip
        else:
            heading = "Your vote was not counted"
            message = (f"The store is unavailable: {err.message} ({err.code}). Open the "
                       "approval again (your link, or the approvals list) and vote once the "
                       "store is back.")  # fmt: skip
        if json:
            return error_json(503, message, err.code)
        page = pages.render(
            "result.html", title="Unavailable", heading=heading, message=message, tone="bad",
            approval=None, back="/approvals" if caller else None,
            **await self.s.page_values(caller),
        )  # fmt: skip
        return html(page, 503)

    async def _link_voter(self, link: str, approval_id: str) -> tuple[str, str]:
        claims, _ = await self.s.aengine.inspect_link(link)
        if claims.approval_id != approval_id:
            raise Denied(403, "Refused", "This link is for another approval.")
        return claims.approver, "a one-time link"

    async def _redeem(
        self, link: str, approval_id: str, decision: str, comment: str | None
    ) -> Approval:
        """Redeem the link for the decision it was made for (any other is refused, unchanged).

        A deny link may be passed around more widely than an approve link (a
        "stop this" button): holding it must never approve.
        """
        claims, _ = await self.s.aengine.inspect_link(link)
        if claims.decision != decision:
            raise ForbiddenError(
                f"this one-time link may only {claims.decision} approval {approval_id}; the "
                f"link for {decision} is the other one sent to {claims.approver}",
                code=ErrorCode.APPROVER_NOT_AUTHORIZED,
            )
        return await self.s.aengine.redeem_link(link, approval_id=approval_id, comment=comment)

    async def _session_voter(self, request: Request, csrf: object, approval_id: str) -> Caller:
        caller = await self.s.caller(request, bearer=False)
        if caller is None or caller.session is None:
            raise Denied(401, "Sign in", "Sign in to vote.", signin=True,
                         then="/approvals/" + quote(approval_id, safe=""))  # fmt: skip
        await self.s.check_csrf(request, vote_binding(caller.session.key, approval_id), csrf)
        if not caller.voter:
            raise Denied(403, "Refused", "This sign-in may look at approvals but votes as no "
                         "approver.")  # fmt: skip
        found = await self.s.aengine.get_approval(approval_id)
        if not caller.token.may_see(found.agent_id):
            raise Denied(404, "Not found", f"There is no approval {approval_id} for you.")
        return caller

    # -- budgets ----------------------------------------------------------------------------

    async def agents(self, request: Request) -> Response:
        """``GET /agents``: the agents with a policy this caller may see."""
        caller = await self.s.require(request, BUDGET_ROLES)
        stored = await self.s.aengine.list_policies(caller.token.org_id)
        rows = [{"id": p.agent_id, "url": pages.agent_url(p.agent_id), "version": p.version,
                 "enabled": p.policy.enabled}
                for p in sorted(stored, key=lambda p: p.agent_id)
                if caller.token.may_see(p.agent_id)]  # fmt: skip
        return html(pages.render("agents.html", title="Agents", agents=rows,
                                  **await self.s.page_values(caller)))  # fmt: skip

    async def agent(self, request: Request) -> Response:
        """``GET /agents/{id}``: limits with bars, budgets above, recent decisions, the policy."""
        agent_id = request.path_params["agent_id"]
        caller = await self.s.require(request, BUDGET_ROLES)
        if not caller.token.may_see(agent_id):
            raise Denied(403, "Not for this token",
                          f"This token is bound to {caller.token.binding}; it may not see "
                          f"{agent_id}.")  # fmt: skip
        stored = await self.s.aengine.get_policy(agent_id)  # a bad id: a 400 page (wrap)
        if stored is None:
            raise Denied(404, "Not found", f"{agent_id} has no policy.", code=ErrorCode.NO_POLICY)
        budget = budget_seen_by(await self.s.aengine.budget(agent_id), caller.token.may_see)
        history = await self.s.aengine.history(agent_id, 50)
        versions = await self.s.aengine.policy_versions(agent_id, 20)
        return html(pages.render(
            "agent.html", title=f"Budget of {agent_id}", agent_id=agent_id,
            at=pages.when(budget.at), version=stored.version, enabled=stored.policy.enabled,
            budgets=pages.budget_views(budget, budget.at), history=pages.history_view(history),
            policy=pages.policy_json(stored.policy), versions=pages.versions_view(versions),
            **await self.s.page_values(caller),
        ))  # fmt: skip

    # -- sessions ---------------------------------------------------------------------------

    async def signin(self, request: Request) -> Response:
        """``GET /signin`` shows the form; ``POST /signin`` turns a token into a session cookie."""
        if request.method in ("GET", "HEAD"):  # HEAD is GET without the body, never a sign-in
            nonce = b64(os.urandom(24))
            response = html(pages.render(
                "signin.html", title="Sign in", error=None, csrf=await self.s.csrf("n:" + nonce),
                next=local_path(request.query_params.get("next"), "/approvals"), who=None,
            ))  # fmt: skip
            self.s.cookie(response, self.s.nonce_cookie, nonce, 3600)
            return response
        form = await _form(request)
        nonce = request.cookies.get(self.s.nonce_cookie, "")
        await self.s.check_csrf(request, "n:" + nonce, form.get("csrf") if nonce else None)
        presented = form.get("token")
        wanted = form.get("next")
        target = local_path(wanted if isinstance(wanted, str) else None, "/approvals")
        try:
            token = await self.s.sync(self._signs_in, presented)
        except TokenRejected as rejected:
            log.info("refused a sign-in with a %s token", rejected.reason)
            if wants_json(request.scope):
                refused = {"WWW-Authenticate": challenge("invalid_token")}
                return error_json(401, "That token does not sign in here: it is not valid, was "
                                  "revoked, has expired, or is for /metrics only.",
                                  headers=refused)  # fmt: skip
            return html(pages.render(
                "signin.html", title="Sign in", csrf=await self.s.csrf("n:" + nonce), next=target,
                error="That token does not sign in here: it is not valid, was revoked, has "
                "expired, or is for /metrics only.", who=None,
            ), 401, {"WWW-Authenticate": challenge("invalid_token")})  # fmt: skip
        secret, session = await self.s.sync(
            self.s.tokens.open_session, token, self.s.options.session_ttl
        )
        if token.role == "agent" and token.agent_id is not None and target == "/approvals":
            target = pages.agent_url(token.agent_id)
        elif token.role == "agent" and target == "/approvals":
            target = "/agents"
        moved = RedirectResponse(target, status_code=303)
        ttl = int((session.expires_at - session.created_at).total_seconds())
        self.s.cookie(moved, self.s.session_cookie, secret, ttl)
        self.s.forget(moved, self.s.nonce_cookie)
        log.info("token %s signed in (%s)", token.id, token.role)
        return moved

    def _signs_in(self, presented: object) -> AccessToken:
        token = self.s.tokens.verify(presented.strip() if isinstance(presented, str) else "")
        if token.role == "metrics":
            raise TokenRejected("metrics")
        return token

    async def signout(self, request: Request) -> Response:
        """``POST /signout``: forget the session and its cookie.

        A POST from another site is refused even without a session: a
        cross-site form carries no ``SameSite=Strict`` cookie, and answering it
        with the cookie's deletion would sign the browser out.
        """
        self.s.check_origin(request)
        form = await _form(request)
        secret = request.cookies.get(self.s.session_cookie)
        caller = await self.s.caller(request, bearer=False)
        if caller is not None and caller.session is not None and secret:
            await self.s.check_csrf(request, "s:" + caller.session.key, form.get("csrf"))
            await self.s.sync(self.s.tokens.close_session, secret)
        response = RedirectResponse("/signin", status_code=303)
        self.s.forget(response, self.s.session_cookie)
        return response
