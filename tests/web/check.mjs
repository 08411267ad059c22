// Drives mrrec's web page in headless Chromium: enter the key, pick a user, ask, watch the
// reasoning stream, and check the items, the tool call and the cited memory. Screenshots go to
// OUT_DIR. With JUDGE_URL (a service whose model scores answers, holding the same user): the
// hybrid method re-ranked by the judge, its scores shown beside the items.
// Usage: node check.mjs BASE_URL API_KEY USER OUT_DIR [JUDGE_URL]
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const [base, key, user, out, judgeBase] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const fail = (msg) => { console.error("FAIL: " + msg); process.exitCode = 1; };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/");
  await page.screenshot({ path: `${out}/1-empty.png`, fullPage: true });

  // A wrong key is refused, visibly.
  await page.fill("#key", "mrk_wrong");
  await page.dispatchEvent("#key", "change");
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("not valid"));

  await page.fill("#key", key);
  await page.dispatchEvent("#key", "change");
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("users"));
  const options = await page.$$eval("#user option", (os) => os.map((o) => o.value));
  if (!options.includes(user)) fail(`user ${user} not listed: ${options}`);
  await page.selectOption("#user", user);
  await page.fill("#category", "Toys & Games");
  await page.fill("#request", "a soft plush bunny for a toddler");
  await page.click("#ask");
  await page.waitForFunction(() => document.querySelectorAll("#items li").length > 0, null, { timeout: 30000 });
  await page.waitForFunction(() => document.querySelector("#timing").textContent.includes("total"));
  await page.screenshot({ path: `${out}/2-answer.png`, fullPage: true });

  const reasoning = await page.textContent("#reasoning");
  if (!reasoning.includes("plush bunny")) fail(`reasoning not streamed: ${reasoning}`);
  const items = await page.$$eval("#items li", (ls) => ls.map((l) => l.textContent));
  if (items.length !== 10) fail(`expected 10 items, got ${items.length}`);
  const calls = await page.$$eval(".call", (cs) => cs.map((c) => c.textContent));
  if (calls.length < 1 || !calls[0].includes("query:")) fail(`no tool call shown: ${calls}`);
  const mems = await page.$$eval(".call .mem", (ms) => ms.map((m) => m.dataset.id));
  if (mems.length < 1) fail("no memory shown");
  const profile = await page.textContent("#profile");
  if (!profile.includes("plush bunny")) fail(`profile: ${profile}`);
  // Hostile memory text is shown as text, never as markup.
  const injected = await page.$$eval("#calls b, #calls script, #calls img", (x) => x.length);
  if (injected !== 0) fail("memory text was rendered as HTML");

  // An unknown user gets the service's message.
  await page.evaluate(() => {
    const o = document.createElement("option");
    o.value = o.textContent = "nobody-here";
    document.querySelector("#user").appendChild(o);
  });
  await page.selectOption("#user", "nobody-here");
  await page.click("#ask");
  await page.waitForFunction(() => document.querySelector("#error").textContent.length > 0);
  const err = await page.textContent("#error");
  if (!err.includes("no memory for user")) fail(`error shown: ${err}`);
  await page.screenshot({ path: `${out}/3-unknown-user.png`, fullPage: true });

  // A retrieval method: items without reasoning, memory or profile.
  await page.selectOption("#user", user);
  await page.selectOption("#method", "hybrid");
  await page.click("#ask");
  await page.waitForFunction(() => document.querySelector("#timing").textContent.includes("total"));
  const hybrid = await page.$$eval("#items li", (ls) => ls.map((l) => l.dataset.id));
  if (hybrid.length !== 10) fail(`hybrid: expected 10 items, got ${hybrid.length}`);
  const noLlm = await page.textContent("#reasoning");
  if (!noLlm.includes("no LLM")) fail(`hybrid reasoning: ${noLlm}`);
  if ((await page.$$(".call")).length !== 0) fail("hybrid showed a tool call");
  if ((await page.textContent("#error")).length !== 0) fail("hybrid showed an error");

  // This service's model cannot score answers: the judge is refused, visibly.
  await page.check("#rerank");
  await page.click("#ask");
  await page.waitForFunction(() => document.querySelector("#error").textContent.length > 0);
  const noJudge = await page.textContent("#error");
  if (!noJudge.includes("cannot score answers")) fail(`re-rank with a model that cannot score: ${noJudge}`);
  let judged = 0;
  if (judgeBase) {
    // The same request re-ranked by a real model: the first five items judged, the rest unmoved.
    await page.goto(judgeBase + "/");
    await page.fill("#key", key);
    await page.dispatchEvent("#key", "change");
    await page.waitForFunction(() => document.querySelector("#status").textContent.includes("users"));
    await page.selectOption("#user", user);
    await page.fill("#category", "Toys & Games");
    await page.fill("#request", "a soft plush bunny for a toddler");
    await page.selectOption("#method", "hybrid");
    await page.check("#rerank");
    await page.fill("#depth", "5");
    await page.fill("#weight", "0.5");
    await page.click("#ask");
    await page.waitForFunction(() => document.querySelector("#timing").textContent.includes("judge"), null, { timeout: 60000 });
    await page.screenshot({ path: `${out}/4-judged.png`, fullPage: true });
    const ids = await page.$$eval("#items li", (ls) => ls.map((l) => l.dataset.id));
    const scored = await page.$$eval("#items li", (ls) => ls.map((l) => l.querySelector(".judge") !== null));
    judged = scored.filter((x) => x).length;
    if (ids.length !== 10) fail(`judged: expected 10 items, got ${ids.length}`);
    if (judged !== 5) fail(`expected 5 judged items, got ${judged}`);
    if (scored.slice(5).some((x) => x)) fail("an item past the depth was judged");
    if (JSON.stringify([...ids.slice(0, 5)].sort()) !== JSON.stringify([...hybrid.slice(0, 5)].sort()))
      fail(`the judge re-ordered other items than hybrid's first five: ${ids} vs ${hybrid}`);
    if (JSON.stringify(ids.slice(5)) !== JSON.stringify(hybrid.slice(5))) fail("items past the depth moved");
    if ((await page.textContent("#error")).length !== 0) fail(`judged: ${await page.textContent("#error")}`);
    const timing = await page.textContent("#timing");
    if (!timing.includes("(weight 0.5)")) fail(`the judge's weight was not sent or not shown: ${timing}`);
  }
  if (errors.length) fail(`page errors: ${errors}`);
  console.log(JSON.stringify({ items: items.length, calls: calls.length, memories: mems.length, profile, hybrid: hybrid.length, judged }));
} finally {
  await browser.close();
}
