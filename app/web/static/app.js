// The qadistill dashboard: one page over the REST API, with the API key typed in once (kept in localStorage).
"use strict";

const KEY_STORAGE = "qadistill.apiKey";
const POLL_MS = 1500;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
// A tiny job to start from (examples/tiny-job.json is this same file).
const EXAMPLE_SPEC_URL = "/static/tiny-job.json";

let timer = null; // the current view's refresh loop; a new view stops the old one

// --- plumbing -------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, error) {
    super(`${status} ${error.code}: ${error.message}`);
    this.status = status;
    this.code = error.code;
    this.param = error.param;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${localStorage.getItem(KEY_STORAGE)}` };
  const init = { method, headers };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({ error: { code: "http_error", message: response.statusText } }));
  if (!response.ok) {
    if (response.status === 401) showKeyForm("That API key was refused: " + data.error.message);
    throw new ApiError(response.status, data.error || { code: "http_error", message: response.statusText });
  }
  return data;
}

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function errorBox(err) {
  const where = err.param ? ` (field: ${err.param})` : "";
  return h("div", { class: "error", "data-testid": "error" }, `${err.message}${where}`);
}

function fmtNumber(value, digits = 4) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "-";
}

function fmtDuration(start, end) {
  if (!start) return "-";
  const seconds = Math.max(0, ((end ? new Date(end) : new Date()) - new Date(start)) / 1000);
  return seconds < 60 ? `${seconds.toFixed(0)} s` : `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function badge(status) {
  return h("span", { class: `badge ${status}`, "data-testid": "status" }, status);
}

function progressBar(fraction) {
  const percent = Math.round((fraction || 0) * 100);
  return h("div", { class: "progress", "data-testid": "progress" }, h("div", { style: `width:${percent}%` }), h("span", {}, `${percent}%`));
}

function every(ms, fn) {
  stopTimer();
  const tick = async () => {
    try {
      if ((await fn()) === false) return; // the view says it is done (a finished job)
    } catch (err) {
      console.error(err);
    }
    timer = setTimeout(tick, ms);
  };
  tick();
}

function stopTimer() {
  if (timer) clearTimeout(timer);
  timer = null;
}

// --- the API key ---------------------------------------------------------------------------------------

function showKeyForm(message) {
  stopTimer();
  localStorage.removeItem(KEY_STORAGE);
  renderWho();
  const input = h("input", { type: "password", id: "api-key", placeholder: "qd_...", autocomplete: "off" });
  const form = h(
    "form",
    {
      onsubmit: (event) => {
        event.preventDefault();
        localStorage.setItem(KEY_STORAGE, input.value.trim());
        renderWho();
        route();
      },
    },
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { class: "muted" }, "`make run` prints one; `qadistill keys create --tenant NAME` makes another. It is kept in this browser only."),
    h("button", { type: "submit" }, "Use this key"),
  );
  view(h("h1", {}, "Sign in"), message ? h("div", { class: "error" }, message) : null, h("section", { class: "card" }, form));
}

function renderWho() {
  const who = document.getElementById("who");
  const key = localStorage.getItem(KEY_STORAGE);
  who.replaceChildren();
  if (key) {
    who.append(`key ${key.slice(0, 10)}…`, h("button", { class: "secondary", onclick: () => showKeyForm() }, "Forget"));
  }
}

function view(...children) {
  document.getElementById("view").replaceChildren(...children.filter((c) => c !== null));
}

// --- jobs ----------------------------------------------------------------------------------------------

function jobsView() {
  const spec = h("textarea", { rows: 12, id: "spec", "data-testid": "spec" });
  fetch(EXAMPLE_SPEC_URL).then((r) => r.text()).then((text) => { if (!spec.value && document.activeElement !== spec) spec.value = text; });
  const idempotency = h("input", { type: "text", id: "idempotency-key", placeholder: "optional: a retry with it returns the same job" });
  const message = h("div");
  const submit = async (event) => {
    event.preventDefault();
    message.replaceChildren();
    let body;
    try {
      body = JSON.parse(spec.value);
    } catch (err) {
      message.replaceChildren(h("div", { class: "error" }, `The spec is not valid JSON: ${err.message}`));
      return;
    }
    try {
      const headers = idempotency.value.trim();
      const job = headers ? await submitWithKey(body, headers) : await api("POST", "/v1/jobs", body);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
  };
  const tbody = h("tbody", { "data-testid": "jobs" });
  view(
    h("h1", {}, "Jobs"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Job", "Name", "Status", "Stage", "Progress", "Ran", "Model", "Created"].map((t) => h("th", {}, t)))), tbody),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Submit a job"),
      h("form", { onsubmit: submit }, h("label", { for: "spec" }, "Pipeline spec (JSON)"), spec, h("label", { for: "idempotency-key" }, "Idempotency key"), idempotency, message, h("p", {}, h("button", { type: "submit", "data-testid": "submit-job" }, "Submit"))),
    ),
  );
  every(POLL_MS * 2, async () => {
    const page = await api("GET", "/v1/jobs?limit=50");
    tbody.replaceChildren(
      ...page.data.map((job) =>
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
          h("td", {}, job.name),
          h("td", {}, badge(job.status)),
          h("td", {}, job.stage || "-"),
          h("td", {}, progressBar(job.progress)),
          h("td", {}, fmtDuration(job.started_at, job.finished_at)),
          h("td", {}, job.model ? `${job.model.name}:${job.model.version}` : "-"),
          h("td", {}, fmtTime(job.created_at)),
        ),
      ),
    );
    if (!page.data.length) tbody.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No job yet: submit one below.")));
  });
}

async function submitWithKey(body, key) {
  const response = await fetch("/v1/jobs", {
    method: "POST",
    headers: { Authorization: `Bearer ${localStorage.getItem(KEY_STORAGE)}`, "Content-Type": "application/json", "Idempotency-Key": key },
    body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new ApiError(response.status, data.error);
  return data;
}

function jobView(jobId) {
  const header = h("div");
  const timeline = h("ul", { class: "timeline", "data-testid": "timeline" });
  const charts = h("div", { class: "charts", "data-testid": "curves" });
  const tables = h("div", { "data-testid": "report" });
  const events = h("div", { class: "events", "data-testid": "events" });
  const message = h("div");
  view(
    h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")),
    header,
    message,
    h("h2", {}, "Stages"),
    timeline,
    h("h2", {}, "Loss curves"),
    charts,
    h("h2", {}, "Results"),
    tables,
    h("h2", {}, "Events"),
    events,
  );
  let lastEvent = 0;
  const stages = new Map(); // stage -> first event time, in order of appearance
  const cancel = async () => {
    try {
      await api("POST", `/v1/jobs/${jobId}/cancel`);
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
  };
  every(POLL_MS, async () => {
    const job = await api("GET", `/v1/jobs/${jobId}`);
    for (;;) {
      const page = await api("GET", `/v1/jobs/${jobId}/events?after=${lastEvent}&limit=500`);
      for (const event of page.data) {
        lastEvent = event.id;
        if (!stages.has(event.stage)) stages.set(event.stage, event.ts);
        const line = `${new Date(event.ts).toLocaleTimeString()} [${event.stage}] ${event.message}`;
        events.append(h("div", { class: event.level }, line));
        events.scrollTop = events.scrollHeight;
      }
      if (page.data.length < 500) break;
    }
    if (job.stage && !stages.has(job.stage)) stages.set(job.stage, job.updated_at);
    const metrics = await api("GET", `/v1/jobs/${jobId}/metrics`);
    renderJobHeader(header, job, cancel);
    renderTimeline(timeline, stages, job);
    renderCurves(charts, metrics.curves);
    renderReport(tables, metrics.final);
    return !FINISHED.has(job.status);
  });
}

function renderJobHeader(node, job, cancel) {
  const finished = FINISHED.has(job.status);
  node.replaceChildren(
    h("h1", {}, `${job.name} `, badge(job.status)),
    h("section", { class: "card" },
      h("div", { class: "row" },
        h("div", {}, h("div", { class: "mono" }, job.id), h("div", { class: "muted" }, `created ${fmtTime(job.created_at)} · ran ${fmtDuration(job.started_at, job.finished_at)}`)),
        h("div", {}, h("div", {}, `stage: ${job.stage || "-"}`), progressBar(job.progress)),
        h("div", { class: "shrink" }, job.model ? h("a", { href: "#/models", "data-testid": "job-model" }, `model ${job.model.name}:${job.model.version}`) : null),
        h("div", { class: "shrink" }, h("button", { class: "danger", onclick: cancel, disabled: finished || job.cancel_requested, "data-testid": "cancel" }, job.cancel_requested && !finished ? "Cancelling…" : "Cancel")),
      ),
      job.error ? errorBox(job.error) : null,
    ),
  );
}

function renderTimeline(node, stages, job) {
  const names = [...stages.keys()];
  node.replaceChildren(
    ...names.map((stage, i) => {
      const end = i + 1 < names.length ? stages.get(names[i + 1]) : job.finished_at;
      const current = stage === job.stage && !FINISHED.has(job.status);
      return h("li", { class: current ? "current" : "" }, stage, h("small", {}, fmtDuration(stages.get(stage), end)));
    }),
  );
}

function renderCurves(node, curves) {
  if (!curves.length) {
    node.replaceChildren(h("p", { class: "muted" }, "No training step logged yet."));
    return;
  }
  node.replaceChildren(...curves.map((curve) => h("div", { class: "chart", "data-testid": "curve" }, h("h3", {}, `${curve.stage} · ${curve.name}`), lineChart(curve.steps, curve.values))));
}

function lineChart(xs, ys) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const [width, height, left, bottom] = [320, 140, 44, 18];
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const minX = Math.min(...xs), maxX = Math.max(...xs);
  const minY = Math.min(...ys), maxY = Math.max(...ys);
  const sx = (x) => left + ((x - minX) / (maxX - minX || 1)) * (width - left - 6);
  const sy = (y) => 6 + (1 - (y - minY) / (maxY - minY || 1)) * (height - bottom - 12);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  add("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom });
  add("line", { class: "axis", x1: left, y1: 0, x2: left, y2: height - bottom });
  add("text", { x: 2, y: 12 }, maxY.toPrecision(3));
  add("text", { x: 2, y: height - bottom }, minY.toPrecision(3));
  add("text", { x: left, y: height - 4 }, `step ${minX}`);
  add("text", { x: width - 60, y: height - 4 }, `step ${maxX}`);
  add("polyline", { points: xs.map((x, i) => `${sx(x).toFixed(1)},${sy(ys[i]).toFixed(1)}`).join(" ") });
  // A dot per logged step: a stage shorter than the logging interval still shows its point.
  if (xs.length <= 40) xs.forEach((x, i) => add("circle", { cx: sx(x).toFixed(1), cy: sy(ys[i]).toFixed(1), r: 2.2 }));
  return svg;
}

function renderReport(node, report) {
  if (!report) {
    node.replaceChildren(h("p", { class: "muted" }, "The tables appear when the job has succeeded."));
    return;
  }
  const sets = report.sets || [{ name: (report.eval || {}).name || "eval", rows: report.rows || [], pairs: (report.eval || {}).pairs, questions: (report.eval || {}).questions }];
  node.replaceChildren(...sets.map((set) => reportTable(set, report.primary)));
}

function reportTable(set, primary) {
  // Speed-up against the teacher ensemble (the model distillation replaces), else against the slowest row.
  const timed = set.rows.filter((r) => r.cpu_ms_per_question);
  const teachers = timed.find((r) => r.model === "teacher-ensemble");
  const slowest = teachers ? teachers.cpu_ms_per_question : Math.max(...timed.map((r) => r.cpu_ms_per_question), 0);
  const columns = ["Model", "MAP", "MRR", "P@1", "Params", "CPU ms/q", "Speed-up", "Zero-shot floor"];
  return h(
    "section",
    { class: "card" },
    h("h3", {}, `${set.name}`, h("span", { class: "muted" }, ` · ${set.questions ?? "?"} questions, ${set.pairs ?? "?"} pairs`)),
    h(
      "table",
      { "data-testid": "report-table" },
      h("thead", {}, h("tr", {}, columns.map((c, i) => h("th", { class: i ? "num" : "" }, c)))),
      h(
        "tbody",
        {},
        set.rows.map((row) =>
          h(
            "tr",
            { class: row.below_floor ? "below-floor" : "" },
            h("td", {}, row.model === primary ? h("strong", {}, row.model) : row.model, row.below_floor ? " (below its floor)" : ""),
            h("td", { class: "num" }, fmtNumber(row.map)),
            h("td", { class: "num" }, fmtNumber(row.mrr)),
            h("td", { class: "num" }, fmtNumber(row.p_at_1)),
            h("td", { class: "num" }, row.params ? Number(row.params).toLocaleString() : "-"),
            h("td", { class: "num" }, fmtNumber(row.cpu_ms_per_question, 1)),
            h("td", { class: "num" }, row.cpu_ms_per_question && slowest ? `${(slowest / row.cpu_ms_per_question).toFixed(1)}x` : "-"),
            h("td", { class: "num" }, fmtNumber(row.floor)),
          ),
        ),
      ),
    ),
  );
}

// --- datasets ------------------------------------------------------------------------------------------

function datasetsView() {
  const file = h("input", { type: "file", id: "dataset-file", accept: ".jsonl,.json,.csv,.tsv,.txt" });
  const name = h("input", { type: "text", id: "dataset-name", placeholder: "default: the file name" });
  const message = h("div", { "data-testid": "upload-result" });
  const tbody = h("tbody", { "data-testid": "datasets" });
  const refresh = async () => {
    const page = await api("GET", "/v1/datasets?limit=100");
    tbody.replaceChildren(
      ...page.data.map((d) =>
        h(
          "tr",
          {},
          h("td", {}, d.name),
          h("td", { class: "mono" }, d.id),
          h("td", {}, d.format),
          h("td", { class: "num" }, d.pairs),
          h("td", { class: "num" }, d.questions),
          h("td", { class: "num" }, d.positives),
          h("td", {}, d.labelled ? "yes" : "no"),
          h("td", {}, fmtTime(d.created_at)),
          h("td", {}, h("button", { class: "secondary", onclick: () => remove(d) }, "Delete")),
        ),
      ),
    );
  };
  const remove = async (dataset) => {
    if (!confirm(`Delete dataset ${dataset.name}?`)) return;
    try {
      await api("DELETE", `/v1/datasets/${dataset.id}`);
      message.replaceChildren(h("div", { class: "ok" }, `Deleted ${dataset.name}.`));
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
    refresh();
  };
  const upload = async (event) => {
    event.preventDefault();
    if (!file.files.length) {
      message.replaceChildren(h("div", { class: "error" }, "Choose a file first."));
      return;
    }
    const form = new FormData();
    form.append("file", file.files[0]);
    if (name.value.trim()) form.append("name", name.value.trim());
    try {
      const d = await api("POST", "/v1/datasets", form);
      message.replaceChildren(h("div", { class: "ok" }, `${d.name}: ${d.pairs} pairs, ${d.questions} questions, ${d.positives} positives.`));
      refresh();
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
  };
  view(
    h("h1", {}, "Datasets"),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Upload"),
      h("p", { class: "muted" }, "JSON Lines, CSV or TSV with question, passage, label (0/1; absent for unlabelled data) and qid (optional). Every row is checked: an error names its line and field."),
      h("form", { onsubmit: upload }, h("div", { class: "row" }, h("div", {}, h("label", { for: "dataset-file" }, "File"), file), h("div", {}, h("label", { for: "dataset-name" }, "Name"), name), h("div", { class: "shrink" }, h("button", { type: "submit", "data-testid": "upload" }, "Upload")))),
      message,
    ),
    h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Id", "Format", "Pairs", "Questions", "Positives", "Labelled", "Uploaded", ""].map((t) => h("th", {}, t)))), tbody),
  );
  refresh();
}

// --- models --------------------------------------------------------------------------------------------

function primaryMap(metrics) {
  const row = (metrics.rows || []).find((r) => r.model === metrics.primary);
  return row ? row.map : null;
}

function modelsView() {
  const body = h("div", { "data-testid": "models" });
  const message = h("div");
  view(h("h1", {}, "Models"), message, body);
  const refresh = async () => {
    const page = await api("GET", "/v1/models?limit=100");
    const names = [...new Set(page.data.map((v) => v.name))];
    const aliases = Object.fromEntries(await Promise.all(names.map(async (n) => [n, await api("GET", `/v1/models/${encodeURIComponent(n)}/aliases`)])));
    if (!names.length) {
      body.replaceChildren(h("p", { class: "muted" }, "No model yet: a job that succeeds registers a version of its spec's name."));
      return;
    }
    body.replaceChildren(
      ...names.map((name) => {
        const versions = page.data.filter((v) => v.name === name);
        const pointing = aliases[name];
        return h(
          "section",
          { class: "card", "data-testid": `model-${name}` },
          h("h2", {}, name),
          h("p", {}, pointing.length ? pointing.map((a) => h("span", { class: "badge", "data-testid": "alias" }, `${a.alias} → ${a.version}`)) : h("span", { class: "muted" }, "no alias: answers come from the latest version")),
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, ["Version", "Primary", "MAP", "Aliases", "Job", "Registered", "Promote to alias"].map((t) => h("th", {}, t)))),
            h("tbody", {}, versions.map((v) => versionRow(v, pointing, message, refresh))),
          ),
        );
      }),
    );
  };
  refresh();
}

function versionRow(version, aliases, message, refresh) {
  const alias = h("input", { type: "text", value: "production", "aria-label": "alias", style: "max-width:140px" });
  const promote = async () => {
    try {
      const moved = await api("PUT", `/v1/models/${encodeURIComponent(version.name)}/aliases/${encodeURIComponent(alias.value.trim())}`, { version: version.version });
      message.replaceChildren(h("div", { class: "ok" }, `${moved.name}@${moved.alias} now answers with version ${moved.version}.`));
      refresh();
    } catch (err) {
      message.replaceChildren(errorBox(err));
    }
  };
  const mine = aliases.filter((a) => a.version === version.version).map((a) => a.alias);
  return h(
    "tr",
    {},
    h("td", {}, version.version),
    h("td", {}, version.metrics.primary || "-"),
    h("td", { class: "num" }, fmtNumber(primaryMap(version.metrics))),
    h("td", {}, mine.join(", ") || "-"),
    h("td", {}, version.job_id ? h("a", { href: `#/jobs/${version.job_id}`, class: "mono" }, version.job_id) : "-"),
    h("td", {}, fmtTime(version.created_at)),
    h("td", {}, h("div", { class: "row" }, alias, h("button", { class: "shrink", onclick: promote, "data-testid": `promote-${version.name}-${version.version}` }, "Promote"))),
  );
}

// --- ask -----------------------------------------------------------------------------------------------

function askView() {
  const model = h("input", { type: "text", id: "ask-model", placeholder: "name, name@alias or name:version" });
  const question = h("input", { type: "text", id: "ask-question", value: "what do bees make?" });
  const passages = h("textarea", { id: "ask-passages", rows: 6 }, "bees make honey.\nthe sky is blue.\nparis is the capital of france.");
  const result = h("div", { "data-testid": "answer" });
  api("GET", "/v1/models?limit=1").then((page) => {
    // Only into an untouched box: a user (or a test) typing meanwhile keeps what they typed.
    if (!model.value && document.activeElement !== model && page.data.length) model.value = page.data[0].name;
  });
  const ask = async (event) => {
    event.preventDefault();
    const candidates = passages.value.split("\n").map((p) => p.trim()).filter(Boolean);
    try {
      const answer = await api("POST", `/v1/models/${encodeURIComponent(model.value.trim())}/answer`, { question: question.value, passages: candidates });
      result.replaceChildren(
        h("p", { class: "muted" }, `${answer.model.name}:${answer.model.version} answered in ${answer.took_ms.toFixed(1)} ms`),
        h("table", {}, h("thead", {}, h("tr", {}, ["#", "Score", "Passage"].map((t) => h("th", {}, t)))), h("tbody", {}, answer.answers.map((a, i) => h("tr", { "data-testid": "ranked" }, h("td", {}, i + 1), h("td", { class: "num" }, a.score.toFixed(4)), h("td", {}, a.passage))))),
      );
    } catch (err) {
      result.replaceChildren(errorBox(err));
    }
  };
  view(
    h("h1", {}, "Ask a model"),
    h(
      "section",
      { class: "card" },
      h("form", { onsubmit: ask }, h("label", { for: "ask-model" }, "Model"), model, h("label", { for: "ask-question" }, "Question"), question, h("label", { for: "ask-passages" }, "Candidate passages, one a line"), passages, h("p", {}, h("button", { type: "submit", "data-testid": "ask" }, "Rank the passages"))),
      result,
    ),
  );
}

// --- routing -------------------------------------------------------------------------------------------

function route() {
  stopTimer();
  if (!localStorage.getItem(KEY_STORAGE)) {
    showKeyForm();
    return;
  }
  const [section, id] = location.hash.replace(/^#\//, "").split("/");
  for (const link of document.querySelectorAll("header nav a")) link.classList.toggle("active", link.getAttribute("href") === `#/${section || "jobs"}`);
  if (section === "jobs" && id) jobView(decodeURIComponent(id));
  else if (section === "datasets") datasetsView();
  else if (section === "models") modelsView();
  else if (section === "ask") askView();
  else jobsView();
}

window.addEventListener("hashchange", route);
renderWho();
route();
