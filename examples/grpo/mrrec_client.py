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

try:  # verl is only needed on the training machine.
    from verl.tools.base_tool import BaseTool  # type: ignore
except Exception:  # noqa: BLE001
    BaseTool = object


class MrrecMemoryTool(BaseTool):
    """`memory_retrieval_tool` for verl. The dataset row carries the user in
    `extra_info.tools_kwargs.memory_retrieval_tool.create_kwargs.user`."""

    def __init__(self, config, tool_schema):
        if BaseTool is not object:
            super().__init__(config, tool_schema)
        self.tool_schema = tool_schema
        self.client = MrrecClient(config.get("url"), os.environ.get(config.get("key_env", "MRREC_KEY")))
        self.users = {}

    def get_openai_tool_schema(self):
        return self.tool_schema

    async def create(self, instance_id=None, user=None, **kwargs):
        import uuid
        instance_id = instance_id or str(uuid.uuid4())
        self.users[instance_id] = {"user": user, "ok": 0}
        return instance_id

    async def execute(self, instance_id, parameters, **kwargs):
        state = self.users[instance_id]
        try:
            text, results = self.client.memory(state["user"], parameters.get("query", ""),
                                               parameters.get("aspects") or [])
            state["ok"] += 1
            return text, 0.0, {"results": len(results)}
        except RuntimeError as e:
            return f"<tool_response>\nerror: {e}\n</tool_response>", 0.0, {"error": str(e)}

    async def calc_reward(self, instance_id, **kwargs):
        return 0.0

    async def release(self, instance_id, **kwargs):
        self.users.pop(instance_id, None)


_CLIENT = None


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's custom reward function: `ground_truth` is the target item id; `solution_str` the
    decoded trajectory (tool responses included, so R_mem is counted from them)."""
    global _CLIENT
    _CLIENT = _CLIENT or MrrecClient()
    r = _CLIENT.reward(ground_truth, response=solution_str)
    return {"score": r["total"], "r_format": r["format"], "r_rec": r["rec"], "r_mem": r["mem"]}


# ---- TRL: a reward function for GRPOTrainer ---------------------------------------------------

def trl_reward(completions, target, **kwargs):
    """`GRPOTrainer(reward_funcs=[trl_reward], ...)`; the dataset has a `target` column."""
    global _CLIENT
    _CLIENT = _CLIENT or MrrecClient()
    out = []
    for c, t in zip(completions, target):
        text = c if isinstance(c, str) else "".join(m.get("content", "") for m in c)
        out.append(_CLIENT.reward(t, response=text)["total"])
    return out


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
    print(json.dumps({"memories": len(results), "reward": r}))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--selftest":
        _selftest(*sys.argv[2:])
    else:
        print(__doc__)
