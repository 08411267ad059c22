"""MR.Rec's memory tool and rewards for an external GRPO trainer (verl, TRL), served by `mrrec serve`.

The Rust trainer (`mrrec train`) and this client use the same code on the server side: the
memory tool is `POST /tools/memory_retrieve`, the reward is `POST /reward` (0.1 R_format +
5 R_rec + 0.1 R_mem, R_rec = NDCG@1000 + NDCG@100 of the target in the profile's ranking).
Standard library only. Run `python3 mrrec_client.py --selftest URL KEY USER TARGET` against a
server to check the wiring.
"""

import json
import os
import sys
import urllib.error
import urllib.request


class MrrecClient:
    """A small HTTP client for the two endpoints (one per process; thread-safe)."""

    def __init__(self, url=None, key=None, timeout=30.0):
        self.url = (url or os.environ.get("MRREC_URL", "http://127.0.0.1:8080")).rstrip("/")
        self.key = key or os.environ.get("MRREC_KEY", "")
        self.timeout = timeout

    def _post(self, path, body):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer " + self.key},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"{path}: HTTP {e.code}: {detail}") from None

    def memory(self, user, query="", aspects=None, k=3):
        """The user's top-k memories for the call; returns (tool_response_text, results)."""
        r = self._post("/tools/memory_retrieve",
                       {"user": user, "query": query, "aspects": aspects or [], "k": k})
        return r["tool_response"], r["results"]

    def reward(self, target, response=None, profile=None, memory_calls_ok=None, weights=None):
        """Reward components of one trajectory: give the whole response text (with its
        tool responses and the final \\boxed{...}) or just the profile."""
        body = {"target": target}
        if response is not None:
            body["response"] = response
        if profile is not None:
            body["profile"] = profile
        if memory_calls_ok is not None:
            body["memory_calls_ok"] = memory_calls_ok
        if weights is not None:
            body["weights"] = weights
        return self._post("/reward", body)


# ---- verl: a tool for the multi-turn tool agent loop, and a custom reward function ----------
#
# The contract is verl 0.9's (checked against verl 0.9.1's `ToolAgentLoop._call_tool`): for every
# tool call the loop runs `instance_id, _ = await tool.create(create_kwargs=row_kwargs)`, then
# `response, reward, metrics = await tool.execute(instance_id, arguments, agent_data=...)` and
# reads `response.text`, then `await tool.release(instance_id)`. Older verl (0.4) passed the
# create kwargs as keyword arguments and took a bare id back; `create` accepts both call forms.

try:  # verl is only needed on the training machine.
    from verl.tools.base_tool import BaseTool  # type: ignore
    from verl.tools.schemas import ToolResponse  # type: ignore
except Exception:  # noqa: BLE001
    BaseTool = object

    class ToolResponse:  # the fields verl's loop reads
        def __init__(self, text=None, image=None, video=None):
            self.text, self.image, self.video = text, image, video


class MrrecMemoryTool(BaseTool):
    """`memory_retrieval_tool` for verl. The dataset row carries the user in
    `extra_info.tools_kwargs.memory_retrieval_tool.create_kwargs.user`."""

    def __init__(self, config, tool_schema):
        if BaseTool is not object:
            super().__init__(config, tool_schema)
        else:
            self.config, self.tool_schema = config, tool_schema
        self.client = MrrecClient(config.get("url"), os.environ.get(config.get("key_env", "MRREC_KEY")))
        self.users = {}

    def get_openai_tool_schema(self):
        return self.tool_schema

    async def create(self, instance_id=None, create_kwargs=None, **kwargs):
        import uuid
        kw = dict(create_kwargs or {})
        kw.update(kwargs)
        user = kw.get("user")
        if not user:
            raise ValueError("memory_retrieval_tool needs the user: put it in the row's "
                             "extra_info.tools_kwargs.memory_retrieval_tool.create_kwargs.user")
        instance_id = instance_id or str(uuid.uuid4())
        self.users[instance_id] = {"user": user, "ok": 0}
        return instance_id, ToolResponse()

    async def execute(self, instance_id, parameters, **kwargs):
        state = self.users[instance_id]
        try:
            text, results = self.client.memory(state["user"], parameters.get("query", ""),
                                               parameters.get("aspects") or [])
            state["ok"] += 1
            return ToolResponse(text=text), 0.0, {"results": len(results)}
        except RuntimeError as e:
            return ToolResponse(text=f"<tool_response>\nerror: {e}\n</tool_response>"), 0.0, {"error": str(e)}

    async def calc_reward(self, instance_id, **kwargs):
        return 0.0

    async def release(self, instance_id, **kwargs):
        self.users.pop(instance_id, None)


_CLIENT = None


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """verl's custom reward function: `ground_truth` is the target item id; `solution_str` the
    decoded trajectory (tool responses included, so R_mem is counted from them)."""
    global _CLIENT
    _CLIENT = _CLIENT or MrrecClient()
    r = _CLIENT.reward(ground_truth, response=solution_str)
    return {"score": r["total"], "r_format": r["format"], "r_rec": r["rec"], "r_mem": r["mem"]}


# ---- TRL: an environment with the memory tool, and a reward function for GRPOTrainer ----------
#
# TRL 1.x's GRPOTrainer runs tools itself: `GRPOTrainer(environment_factory=MrrecEnvironment,
# reward_funcs=[trl_reward], ...)` makes one environment per rollout, calls `reset(**row)` with the
# dataset row (columns `user` and `target`), exposes its public methods as tools (by name, type
# hints and Google-style docstring) and calls `reward_funcs(prompts=, completions=,
# completion_ids=, **columns)`.

class MrrecEnvironment:
    """One rollout's view of the memory: the row's user, set by `reset`."""

    def __init__(self, url=None, key=None):
        self._client = MrrecClient(url, key)
        self._user = None

    def reset(self, user=None, **row):
        if not user:
            raise ValueError("each training row needs a `user` column (whose memory the tool reads)")
        self._user = user
        return None

    def memory_retrieval_tool(self, query: str, aspects: list[str] | None = None) -> str:
        """Retrieves the current user's memories (past purchases and reviews, per-category preference summaries, an overall profile) most relevant to a query.

        Args:
            query: What to look up in the user's memory.
            aspects: Optional aspects of the product to focus on.

        Returns:
            The memories, one per line, inside <tool_response> tags.
        """
        try:
            text, _ = self._client.memory(self._user, query, aspects or [])
            return text
        except RuntimeError as e:
            return f"<tool_response>\nerror: {e}\n</tool_response>"


def trl_reward(completions, target, **kwargs):
    """`GRPOTrainer(reward_funcs=[trl_reward], ...)`; the dataset has a `target` column.
    Conversational completions (assistant and tool messages) are joined, so the tool responses
    count towards R_mem."""
    global _CLIENT
    _CLIENT = _CLIENT or MrrecClient()
    out = []
    for c, t in zip(completions, target):
        text = c if isinstance(c, str) else "".join(_content(m) for m in c)
        out.append(_CLIENT.reward(t, response=text)["total"])
    return out


def _content(message):
    c = message.get("content") or ""
    if isinstance(c, list):  # multimodal parts
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c


def _verl_call(tool, row_tools_kwargs, arguments):
    """One tool call the way verl 0.9.1's `ToolAgentLoop._call_tool` makes it (its BaseTool
    branch, without the parts that need torch)."""
    import asyncio

    async def call():
        kwargs = row_tools_kwargs.get("memory_retrieval_tool", {})
        instance_id = None
        try:
            instance_id, _ = await tool.create(create_kwargs=kwargs.get("create_kwargs", {}))
            response, reward, metrics = await tool.execute(instance_id, json.loads(arguments), agent_data=None)
        finally:
            if instance_id:
                await tool.release(instance_id)
        return response.text, reward, metrics

    return asyncio.run(call())


def _trl_tools(env):
    """The tools TRL 1.16's GRPOTrainer exposes for an environment instance."""
    import inspect
    return {name: getattr(env, name) for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")}


def _selftest(url, key, user, target):
    # The verl and TRL entry points read the server from the environment.
    os.environ["MRREC_URL"], os.environ["MRREC_KEY"] = url, key
    c = MrrecClient(url, key)
    text, results = c.memory(user, "what they bought before")
    assert text.startswith("<tool_response>"), text
    response = (text + ' \\boxed{"ideal_item_profile": "a soft plush toy", "useful_memory_ids": []}')
    r = c.reward(target, response=response)
    assert r["format"] == 1.0 and r["mem"] == (1.0 if results else 0.0), r
    score = compute_score("mrrec", response, target)
    assert abs(score["score"] - r["total"]) < 1e-9, (score, r)
    assert abs(trl_reward([response], [target])[0] - r["total"]) < 1e-9
    try:
        c.reward("NOT-AN-ITEM", profile="x")
        raise AssertionError("an unknown target must be refused")
    except RuntimeError as e:
        assert "HTTP 400" in str(e), e

    # verl: the tool as the agent loop calls it, with the row's tools_kwargs.
    tool = MrrecMemoryTool({"url": url, "key_env": "MRREC_KEY"}, None)
    row = {"memory_retrieval_tool": {"create_kwargs": {"user": user}}}
    vtext, _, metrics = _verl_call(tool, row, '{"query": "what they bought before"}')
    assert vtext == text and metrics == {"results": len(results)}, (vtext, metrics)
    assert not tool.users, "release must drop the instance"
    try:
        _verl_call(tool, {}, '{"query": "x"}')
        raise AssertionError("a row without a user must be refused")
    except ValueError as e:
        assert "create_kwargs.user" in str(e), e

    # TRL: the environment's tools as GRPOTrainer finds them; a conversational completion.
    env = MrrecEnvironment()
    assert env.reset(prompt=[{"role": "user", "content": "hi"}], user=user, target=target) is None
    tools = _trl_tools(env)
    assert list(tools) == ["memory_retrieval_tool"], tools
    ttext = tools["memory_retrieval_tool"](query="what they bought before")
    assert ttext == text, ttext
    completion = [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "memory_retrieval_tool", "arguments": {"query": "what they bought before"}}}]},
        {"role": "tool", "name": "memory_retrieval_tool", "content": ttext},
        {"role": "assistant", "content": ' \\boxed{"ideal_item_profile": "a soft plush toy", "useful_memory_ids": []}'},
    ]
    tr = trl_reward(prompts=[[]], completions=[completion], completion_ids=[[]], target=[target], user=[user])
    assert abs(tr[0] - r["total"]) < 1e-9, (tr, r)
    try:  # the schema transformers builds from the docstring, when transformers is installed
        from transformers.utils import get_json_schema  # type: ignore
        schema = get_json_schema(tools["memory_retrieval_tool"])
        assert schema["function"]["name"] == "memory_retrieval_tool", schema
        assert schema["function"]["parameters"]["required"] == ["query"], schema
        checked_schema = True
    except ImportError:
        checked_schema = False
    print(json.dumps({"memories": len(results), "reward": r, "verl": True, "trl": True,
                      "trl_schema_checked": checked_schema}))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--selftest":
        _selftest(*sys.argv[2:])
    else:
        print(__doc__)
