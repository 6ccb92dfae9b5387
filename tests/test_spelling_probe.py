"""An adversarial probe of how a payment's network, category and recipient are compared.

The governed agent tries to slip past a blocked network, category or
recipient, out of a scope's match, or into a fresh ``groupBy`` group (a new,
empty budget) by spelling the same thing another way: case, whitespace,
Unicode look-alikes and digits of other scripts, zero-width characters,
combining marks, compatibility forms, and the same in the policy's own lists;
through the engine, the async engine, the MCP tools and the CLI.

Two defects were found and fixed:

- Categories compared as ``casefold(NFKC(x))``, which is not closed under
  case folding: a Greek category written with a capital and a combining
  accent (``KAIKI_CAPS`` below) folded to another sequence of code points than the same
  word in small letters (``καΐκι``, whose ``ΐ`` folds to three), so it was
  ALLOWED past a block of ``καΐκι``, outside a scope of it, and counted in a
  fresh ``groupBy: category`` group. Categories now compare in Unicode's
  compatibility caseless form (D146).
- ``network_form`` dropped leading zeros before the network was checked, so
  ``eip155:`` and a reference of any length (100,000 zeros, then ``8453``)
  was taken as ``eip155:8453``, while CAIP-2 bounds a reference to 32
  characters (and the MCP tools refuse it by their schema's ``maxLength``).
  A reference longer than 32 characters is now INVALID_INPUT, as written.

Everything else tried is pinned below as it behaves (sound, or documented).
"""

from __future__ import annotations

import asyncio
import io
import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpolicy import PolicyValidationError, cli, load_policy
from agentpolicy._checks import category_form, category_key
from agentpolicy.aio import AsyncPolicyEngine
from agentpolicy.mcp import AgentPolicyMcpServer
from agentpolicy.storage import MemoryStorage
from agentpolicy.testing import ManualClock, engine_with_policy, payment

ADDRESS = "0x52908400098527886E0F7030069857D2E4169EE7"  # EIP-55 checksummed

# One Greek word, two spellings that are one word ignoring case: small letters with
# U+0390 (iota with dialytika and tonos, which case folds to three code points), and
# capitals with U+03AA (capital iota with dialytika) and a combining acute.
KAIKI = "\u03ba\u03b1\u0390\u03ba\u03b9"  # καΐκι
KAIKI_CAPS = "\u039a\u0391\u03aa\u0301\u039a\u0399"  # the same in capitals
# More such pairs: ΰ and Ϋ with an acute; ῷ and capital omega with prosgegrammeni
# and a combining perispomeni (the iota subscript case folds to a separate iota).
GREEK_PAIRS = [
    (KAIKI, KAIKI_CAPS),
    ("\u03b0", "\u03ab\u0301"),
    ("\u1ff7", "\u1ffc\u0342"),
    ("\u1fb7", "\u1fbc\u0342"),
]


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _digits(text: str, zero: int) -> str:
    """ASCII digits as the decimal digits of another script (``zero`` is its 0)."""
    return "".join(chr(zero + int(c)) if "0" <= c <= "9" else c for c in text)


def _scoped(group_by: str | None = None, **match: list[str]) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "name": "one a day",
        "match": match,
        "limits": {"counts": [{"window": "daily", "max": 1}]},
    }
    if group_by is not None:
        scope["groupBy"] = group_by
    return {"scopedLimits": [scope]}


def _refused(field: str, **kwargs: Any) -> PolicyValidationError:
    with pytest.raises(PolicyValidationError) as err:
        payment(**kwargs)
    assert err.value.code == "INVALID_INPUT"
    assert [p.path for p in err.value.problems] == [f"$.{field}"]
    return err.value


# -- networks -------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["EIP155:8453", "Eip155:8453", "eIP155:08453"])
def test_the_namespace_in_any_case_is_one_network_to_rules_scopes_and_groups(
    spelling: str,
) -> None:
    """Sound: CAIP-2 namespaces are compared ignoring case, as policy.md says."""
    engine, _ = engine_with_policy({"networkRules": {"blockedNetworks": ["eip155:8453"]}})
    assert engine.authorize(payment(network=spelling)).code == "NETWORK_BLOCKED"
    engine, _ = engine_with_policy({"networkRules": {"allowedNetworks": [spelling]}})
    assert engine.authorize(payment(network="eip155:8453")).code == "ALLOWED"
    engine, _ = engine_with_policy(_scoped("network", networks=["eip155:8453"]))
    assert engine.authorize(payment(network="eip155:8453")).code == "ALLOWED"
    assert engine.authorize(payment(network=spelling)).code == "SCOPED_LIMIT"


@pytest.mark.parametrize(
    "spelling",
    [
        "eip155:8453 ",  # whitespace at either end
        " eip155:8453",
        "eip155: 8453",
        "eip155:8453\n",
        "eip155:\u200b8453",  # zero-width space
        "eip155:8453\u200d",  # zero-width joiner
        "eip155:8453\ufe0f",  # variation selector
        "eip155:8453\u0301",  # combining acute
        "eip155:\u00a08453",  # no-break space
        "eip155:" + _fullwidth("8453"),  # which int() reads as 8453
        "eip155:" + _digits("8453", 0x0660),  # Arabic-Indic, which int() and isdigit() accept
        "eip155:" + _digits("08453", 0x06F0),  # extended Arabic-Indic, with a leading zero
        "eip155:" + _digits("8453", 0x0966),  # Devanagari
        "eip155:" + _digits("8453", 0x1D7CE),  # mathematical bold, NFKC 8453
        "eip155:\u2078\u2074\u2075\u00b3",  # superscripts, NFKC 8453
        _fullwidth("eip155") + ":8453",
        "eip155\uff1a8453",  # fullwidth colon
        "e\u0131p155:8453",  # dotless i
        "e\u0130p155:8453",  # dotted capital I (its lower case is two code points)
        "eip155:+8453",
        "eip155::8453",
        "eip155:8453:",
        "eip155:8453.",
    ],
)
def test_a_network_spelled_with_anything_but_ascii_caip2_is_invalid_input(spelling: str) -> None:
    """Sound: nothing is normalised into a network; every other spelling is refused."""
    engine, _ = engine_with_policy(_scoped("network"))
    with pytest.raises(PolicyValidationError) as err:
        engine.authorize(payment(network=spelling))
    assert err.value.code == "INVALID_INPUT"
    assert [p.path for p in err.value.problems] == ["$.network"]
    assert engine.authorize(payment(network="eip155:8453")).code == "ALLOWED"  # nothing counted


@pytest.mark.parametrize(
    "spelling",
    [
        "eip155:0x2105",
        "eip155:0X2105",
        "eip155:8453e0",
        "eip155:8_453",
        "eip155:0_8453",
        "eip155:-0",
        "eip155:08453-",
        "EIP155:0b10000100000101",
    ],
)
def test_an_eip155_reference_that_is_not_decimal_is_invalid_input(spelling: str) -> None:
    """Sound (pinned): the decimal rule catches what leading zeros hide, in any case."""
    err = _refused("network", network=spelling)
    assert "decimal" in err.problems[0].message
    assert spelling in err.problems[0].message  # as written, not as it would be kept


@pytest.mark.parametrize("zeros", [26, 30, 100, 100_000])
def test_leading_zeros_do_not_let_a_reference_past_caip2s_32_characters(zeros: int) -> None:
    """Defect: ``eip155:`` and 30 or 100,000 zeros before 8453 was accepted as eip155:8453.

    Leading zeros were dropped before the network was checked, so its length was
    judged after: a network of any length passed (the MCP tools refuse one over 64
    characters by their schema). Now the written reference is bounded as CAIP-2 says.
    """
    network = "eip155:" + "0" * zeros + "8453"
    if len(network) - len("eip155:") <= 32:
        assert payment(network=network).network == "eip155:8453"
        return
    err = _refused("network", network=network)
    assert "CAIP-2" in err.problems[0].message or "at most 64" in err.problems[0].message


def test_a_reference_of_32_characters_with_leading_zeros_is_still_kept_without_them() -> None:
    assert payment(network="eip155:" + "0" * 28 + "8453").network == "eip155:8453"
    assert payment(network="EIP155:" + "0" * 32).network == "EIP155:0"
    _refused("network", network="eip155:" + "0" * 29 + "8453")  # 33 characters


def test_a_policy_lists_networks_in_any_spelling_a_payment_is_kept_in() -> None:
    """Sound: a policy's list in another case, with leading zeros, still matches."""
    for listed in ("EIP155:08453", "eip155:0008453", "Eip155:8453"):
        engine, _ = engine_with_policy({"networkRules": {"blockedNetworks": [listed]}})
        for sent in ("eip155:8453", "EIP155:8453", "eip155:08453"):
            assert engine.authorize(payment(network=sent)).code == "NETWORK_BLOCKED"
        engine, _ = engine_with_policy(_scoped("recipient", networks=[listed]))
        assert engine.authorize(payment(network="eip155:08453")).code == "ALLOWED"
        assert engine.authorize(payment(network="eip155:8453")).code == "SCOPED_LIMIT"


def test_other_namespaces_compare_ignoring_case_and_keep_their_zeros() -> None:
    """Documented: other references compare ignoring case (which only ever joins more)."""
    solana = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
    engine, _ = engine_with_policy({"networkRules": {"blockedNetworks": [solana]}})
    assert engine.authorize(payment(network=solana.upper())).code == "NETWORK_BLOCKED"
    assert engine.authorize(payment(network="SOLANA:" + solana[7:])).code == "NETWORK_BLOCKED"
    engine, _ = engine_with_policy(_scoped("network"))
    assert engine.authorize(payment(network="bip122:000000000019d6689c085ae165831e93")).allowed
    assert engine.authorize(payment(network="bip122:19d6689c085ae165831e93")).allowed  # another


# -- categories -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "Data",
        "DATA",
        "dAtA",
        _fullwidth("data"),
        _fullwidth("DaTa"),
        "\U0001d41d\U0001d41a\U0001d42d\U0001d41a",  # mathematical bold
        "\U0001d5bd\U0001d5ba\U0001d5cd\U0001d5ba",  # mathematical sans-serif
        "\u24d3\u24d0\u24e3\u24d0",  # circled letters, NFKC data
    ],
)
def test_a_category_in_another_case_or_compatibility_form_is_the_category(spelling: str) -> None:
    """Sound: policy.md promises categories compare ignoring case and compatibility forms."""
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": ["data"]}})
    assert engine.authorize(payment(category=spelling)).code == "CATEGORY_BLOCKED"
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": [spelling]}})
    assert engine.authorize(payment(category="data")).code == "CATEGORY_BLOCKED"
    engine, _ = engine_with_policy(_scoped("category", categories=["data"]))
    assert engine.authorize(payment(category="data")).code == "ALLOWED"
    assert engine.authorize(payment(category=spelling)).code == "SCOPED_LIMIT"


def test_sharp_s_and_ss_and_the_long_s_are_one_category() -> None:
    """Sound: case folding joins ß, ẞ and ss; NFKC reads the long s as s."""
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": ["strasse"]}})
    for spelling in ("stra\u00dfe", "STRA\u1e9eE", "STRASSE", "\u017ftrasse"):
        assert engine.authorize(payment(category=spelling)).code == "CATEGORY_BLOCKED"
    engine, _ = engine_with_policy(_scoped("category"))
    assert engine.authorize(payment(category="stra\u00dfe")).code == "ALLOWED"
    assert engine.authorize(payment(category="strasse")).code == "SCOPED_LIMIT"


def test_an_accent_as_one_code_point_or_two_is_one_category() -> None:
    """Sound: NFKC composes ``e`` and a combining acute into ``é``, on either side."""
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": ["donne\u0301es"]}})
    assert engine.authorize(payment(category="donn\u00e9es")).code == "CATEGORY_BLOCKED"
    assert engine.authorize(payment(category="DONN\u00c9ES")).code == "CATEGORY_BLOCKED"
    engine, _ = engine_with_policy(_scoped("category"))
    assert engine.authorize(payment(category="donn\u00e9es")).code == "ALLOWED"
    assert engine.authorize(payment(category="DONNE\u0301ES")).code == "SCOPED_LIMIT"


@pytest.mark.parametrize(("listed", "sent"), [*GREEK_PAIRS, *[(b, a) for a, b in GREEK_PAIRS]])
def test_a_greek_category_in_capitals_with_a_combining_accent_is_the_category(
    listed: str, sent: str
) -> None:
    """Defect: ``KAIKI_CAPS`` was ALLOWED past a block of ``καΐκι`` (a fresh group, no scope).

    ``casefold(NFKC(x))`` folded U+0390 to three code points but U+03AA U+0301 to
    two; both spellings are one word ignoring case and compatibility forms.
    """
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": [listed]}})
    assert engine.authorize(payment(category=sent)).code == "CATEGORY_BLOCKED"  # was ALLOWED
    engine, _ = engine_with_policy({"categoryRules": {"allowedCategories": [listed]}})
    assert engine.authorize(payment(category=sent)).code == "ALLOWED"  # CATEGORY_NOT_ALLOWED
    engine, _ = engine_with_policy(_scoped("category"))
    assert engine.authorize(payment(category=listed)).code == "ALLOWED"
    assert engine.authorize(payment(category=sent)).code == "SCOPED_LIMIT"  # a fresh group
    engine, _ = engine_with_policy(_scoped(None, categories=[listed]))
    assert engine.authorize(payment(category=listed)).code == "ALLOWED"
    assert engine.authorize(payment(category=sent)).code == "SCOPED_LIMIT"  # out of the scope


def test_a_category_is_kept_as_written_unless_its_case_folds_apart() -> None:
    """The kept category is NFKC; only a spelling whose folding parts ways is kept folded."""
    assert payment(category="Data").category == "Data"
    assert payment(category=_fullwidth("Data")).category == "Data"
    assert payment(category="DONNE\u0301ES").category == "DONN\u00c9ES"
    assert payment(category=KAIKI).category == KAIKI
    assert payment(category=KAIKI_CAPS).category == KAIKI  # the one word, in small letters
    for a, b in GREEK_PAIRS:
        kept_a, kept_b = payment(category=a).category, payment(category=b).category
        assert kept_a is not None
        assert kept_b is not None
        assert kept_a.casefold() == kept_b.casefold()  # what rules.py compares
        assert category_key(kept_a) == category_key(kept_b) == category_key(a)
        assert unicodedata.is_normalized("NFKC", kept_b)


@pytest.mark.parametrize(
    "spelling",
    [
        "data\u200b",  # zero-width space
        "da\u200dta",  # zero-width joiner
        "data\u00ad",  # soft hyphen
        "data\ufe0f",  # variation selector
        "data\u034f",  # combining grapheme joiner
        "data\u3164",  # Hangul filler
        "data\u2800",  # blank Braille pattern
        "data\u3000",  # ideographic space (NFKC: an ASCII space at the end)
        "data ",
        " data",
        "\u00a8data",  # diaeresis: NFKC is a space and a combining mark, at the start
        "data\u202e",  # right-to-left override
    ],
)
def test_a_category_with_something_that_shows_nothing_is_invalid_input(spelling: str) -> None:
    """Sound: refused (with its path), never normalised into the category it looks like."""
    engine, _ = engine_with_policy(_scoped("category"))
    with pytest.raises(PolicyValidationError) as err:
        engine.authorize(payment(category=spelling))
    assert err.value.code == "INVALID_INPUT"
    assert [p.path for p in err.value.problems] == ["$.category"]
    assert engine.authorize(payment(category="data")).code == "ALLOWED"  # nothing counted


def test_a_unicode_space_inside_a_category_is_the_ascii_space_it_maps_to() -> None:
    """Sound: NFKC maps a no-break or ideographic space inside to " ", on both sides alike."""
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": ["api usage"]}})
    for spelling in ("api\u00a0usage", "api\u3000usage", "API\u2002USAGE"):
        assert payment(category=spelling).category == spelling.replace(spelling[3], " ")
        assert engine.authorize(payment(category=spelling)).code == "CATEGORY_BLOCKED"


@pytest.mark.parametrize(
    "lookalike",
    [
        "d\u0430ta",  # Cyrillic a
        "gamb\u0131ing",  # dotless i
        "d\u0251ta",  # Latin alpha
    ],
)
def test_look_alike_letters_of_other_scripts_are_other_categories(lookalike: str) -> None:
    """Documented (policy.md): look-alikes are other categories; only an allow-list stops them."""
    engine, _ = engine_with_policy({"categoryRules": {"blockedCategories": ["data", "gambling"]}})
    assert engine.authorize(payment(category=lookalike)).code == "ALLOWED"
    engine, _ = engine_with_policy({"categoryRules": {"allowedCategories": ["data", "gambling"]}})
    assert engine.authorize(payment(category=lookalike)).code == "CATEGORY_NOT_ALLOWED"


_PIECES = [
    *"aAeEiIoOsSkKjJhH",
    *GREEK_PAIRS[0][0],
    *GREEK_PAIRS[0][1],
    "\u0390",
    "\u03b0",
    "\u1fb3",
    "\u1fbc",
    "\u1ff7",
    "\u1ffc",
    "\u01f0",
    "\u1e96",
    "\u0130",
    "\u00df",
    "\u1e9e",
    "\ufb01",
    "\u212a",
    "\u017f",
    "\u0345",
    "\u0301",
    "\u0308",
    "\u0313",
    "\u0342",
    "\u030c",
    "\u0331",
    "\u0323",
    "\u1bab",
]


@st.composite
def _caseless_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """A category and another spelling of it: case changed, (de)composed, or both."""
    word = "".join(draw(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=5)))
    forms = [
        lambda s: s,
        str.upper,
        str.lower,
        str.casefold,
        str.title,
        *[lambda s, f=f: unicodedata.normalize(f, s) for f in ("NFC", "NFD", "NFKC", "NFKD")],
    ]
    other = word
    for _ in range(draw(st.integers(1, 3))):
        other = draw(st.sampled_from(forms))(other)
    return word, other


def _compatibility_caseless(text: str) -> str:
    """Unicode's compatibility caseless match (D146): NFKD(cf(NFKD(cf(NFD(X)))))."""
    first = unicodedata.normalize("NFKD", unicodedata.normalize("NFD", text).casefold())
    return unicodedata.normalize("NFKD", first.casefold())


@given(_caseless_spellings())
def test_two_spellings_unicode_matches_caselessly_are_one_category(pair: tuple[str, str]) -> None:
    a, b = pair
    if not b or _compatibility_caseless(a) != _compatibility_caseless(b):
        return
    kept_a, kept_b = category_form(a), category_form(b)
    assert category_key(a) == category_key(b) == category_key(kept_a) == category_key(kept_b)
    assert kept_a.casefold() == kept_b.casefold() == category_key(a)  # as rules.py compares
    assert category_form(kept_a) == kept_a
    assert unicodedata.is_normalized("NFKC", kept_a)


# -- recipients -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ADDRESS,
        ADDRESS.lower(),
        ADDRESS.upper(),
        "0X" + ADDRESS[2:],
        ADDRESS[2:],
        ADDRESS[2:].lower(),
    ],
)
def test_an_evm_address_in_any_case_with_or_without_0x_is_one_recipient(spelling: str) -> None:
    """Sound: hex addresses compare ignoring case; 40 hex digits are the 0x address."""
    for listed in (ADDRESS, ADDRESS.lower(), ADDRESS[2:]):
        engine, _ = engine_with_policy({"merchantRules": {"blacklist": [listed]}})
        assert engine.authorize(payment(recipient=spelling)).code == "RECIPIENT_BLOCKED"
        policy = {"merchantRules": {"whitelist": [listed], "requireWhitelist": True}}
        engine, _ = engine_with_policy(policy)
        assert engine.authorize(payment(recipient=spelling)).code == "ALLOWED"
    engine, _ = engine_with_policy(_scoped("recipient", recipients=[ADDRESS]))
    assert engine.authorize(payment(recipient=ADDRESS.lower())).code == "ALLOWED"
    assert engine.authorize(payment(recipient=spelling)).code == "SCOPED_LIMIT"


@pytest.mark.parametrize(
    "spelling",
    [
        " " + ADDRESS,
        ADDRESS + " ",
        ADDRESS + "\u200b",
        "0x\u200b" + ADDRESS[2:],
        ADDRESS + "\ufe0f",
        ADDRESS + "\u3164",
        ADDRESS + "\n",
        "\u202e" + ADDRESS,
    ],
)
def test_an_address_with_spaces_or_invisible_characters_is_invalid_input(spelling: str) -> None:
    engine, _ = engine_with_policy(_scoped("recipient"))
    with pytest.raises(PolicyValidationError) as err:
        engine.authorize(payment(recipient=spelling))
    assert [p.path for p in err.value.problems] == ["$.recipient"]
    assert engine.authorize(payment(recipient=ADDRESS)).code == "ALLOWED"  # nothing counted


def test_an_address_with_a_final_dot_is_folded_as_a_name_and_still_blocked() -> None:
    engine, _ = engine_with_policy({"merchantRules": {"blacklist": [ADDRESS]}})
    assert engine.authorize(payment(recipient=ADDRESS + ".")).code == "RECIPIENT_BLOCKED"


@pytest.mark.parametrize(
    "spelling",
    [
        _fullwidth(ADDRESS),
        "0x" + _digits(ADDRESS[2:], 0x0660),  # int(x, 16) reads it as the address
        "0x" + _digits(ADDRESS[2:], 0xFF10),
    ],
)
def test_an_address_in_digits_or_letters_of_other_scripts_compares_apart(spelling: str) -> None:
    """Left alone (documented: forms without a dot compare exactly): no EVM signer pays it.

    ``int(x, 16)`` reads Arabic-Indic and fullwidth digits, but eth_utils (and so
    web3 and x402's signer) refuses such an address, and a whitelist admits it only
    as listed.
    """
    eth_utils = pytest.importorskip("eth_utils")
    assert not eth_utils.is_address(spelling)
    policy = {"merchantRules": {"whitelist": [ADDRESS], "requireWhitelist": True}}
    engine, _ = engine_with_policy(policy)
    assert engine.authorize(payment(recipient=spelling)).code == "RECIPIENT_NOT_WHITELISTED"


# -- the other ways in: async engine, MCP tools, CLI ---------------------------------------

_BLOCKING = {
    "networkRules": {"blockedNetworks": ["eip155:8453"]},
    "categoryRules": {"blockedCategories": [KAIKI]},
    "merchantRules": {"blacklist": [ADDRESS]},
}


def test_the_async_engine_compares_as_the_engine_does() -> None:
    async def main() -> list[str]:
        async with AsyncPolicyEngine(clock=ManualClock()) as engine:
            await engine.set_policy("agent-1", _BLOCKING)
            codes = [
                str((await engine.authorize(payment(**kwargs))).code)
                for kwargs in (
                    {"network": "EIP155:08453"},
                    {"network": "eip155:1", "category": KAIKI_CAPS},
                    {"network": "eip155:1", "recipient": ADDRESS[2:].lower()},
                )
            ]
            with pytest.raises(PolicyValidationError):
                await engine.authorize(payment(network="eip155:" + "0" * 40 + "8453"))
            return codes

    assert asyncio.run(main()) == ["NETWORK_BLOCKED", "CATEGORY_BLOCKED", "RECIPIENT_BLOCKED"]


def test_the_mcp_tools_compare_as_the_engine_does() -> None:
    storage = MemoryStorage()
    admin = AgentPolicyMcpServer(storage=storage, role="admin", clock=ManualClock())
    agent = AgentPolicyMcpServer(storage=storage, clock=admin.engine.clock)
    assert asyncio.run(
        admin.handle_tool_call("agent_policy_set", {"agentId": "bot", "policy": _BLOCKING})
    )["success"]

    def authorize(**changes: str) -> dict[str, Any]:
        args = {"agentId": "bot", "amount": "1", "recipient": "0xv", "network": "eip155:1"}
        result: dict[str, Any] = asyncio.run(
            agent.handle_tool_call("agent_policy_authorize", {**args, **changes})
        )
        return result

    assert authorize(network="EIP155:08453")["data"]["code"] == "NETWORK_BLOCKED"
    assert authorize(category=KAIKI_CAPS)["data"]["code"] == "CATEGORY_BLOCKED"
    assert authorize(recipient=ADDRESS.lower())["data"]["code"] == "RECIPIENT_BLOCKED"
    for bad in ("eip155:0x2105", "eip155:" + _digits("8453", 0x0660), "eip155:" + "0" * 40 + "1"):
        error = authorize(network=bad)["error"]
        assert (error["code"], error["path"]) == ("INVALID_INPUT", "$.network")


def test_the_cli_compares_as_the_engine_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, policy = str(tmp_path / "cli.db"), tmp_path / "policy.json"
    policy.write_text(json.dumps(_BLOCKING, ensure_ascii=False), encoding="utf-8")
    assert cli.main(["policy", "set", "bot", str(policy), "--db", db], out=io.StringIO()) == 0

    def authorize(network: str, *more: str) -> tuple[int, str]:
        out = io.StringIO()
        status = cli.main(
            ["authorize", "bot", "1", "0xv", network, *more, "--db", db, "--json"], out
        )
        return status, out.getvalue()

    status, out = authorize("EIP155:08453")
    assert (status, json.loads(out)["code"]) == (3, "NETWORK_BLOCKED")
    status, out = authorize("eip155:1", "--category", KAIKI_CAPS)
    assert (status, json.loads(out)["code"]) == (3, "CATEGORY_BLOCKED")
    capsys.readouterr()
    assert authorize("eip155:" + "0" * 40 + "8453")[0] == 2
    assert "INVALID_INPUT: $.network" in capsys.readouterr().err
    assert authorize("eip155:" + _fullwidth("8453"))[0] == 2
    assert "INVALID_INPUT: $.network" in capsys.readouterr().err


def test_a_policy_file_may_list_the_spellings_it_means() -> None:
    """A policy's own lists keep their spelling (a dump is unchanged) and compare folded."""
    policy = load_policy(
        {
            "networkRules": {"blockedNetworks": ["EIP155:08453"]},
            "categoryRules": {"blockedCategories": [KAIKI_CAPS]},
        }
    )
    assert policy.network_rules is not None
    assert policy.category_rules is not None
    assert policy.network_rules.blocked_networks == ("EIP155:08453",)
    assert policy.category_rules.blocked_categories == (KAIKI_CAPS,)
    assert category_key(KAIKI) in policy.category_rules.blocked
