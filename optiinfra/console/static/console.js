// The operators' console: lists read once, then kept live by the change feed.
// Everything shown is built with textContent: nothing from the server is
// ever parsed as HTML.
import { ApiError, call, forgetKey, keepKey, storedKey } from "./api.js";
import { Feed } from "./feed.js";

const FINAL_TASK = new Set(["completed", "failed", "timeout", "cancelled"]);
const IN_FLIGHT = new Set(["sent", "running"]);
const ROLLBACK_STEP = new Set(["rolling_back", "rolled_back", "rollback_failed"]);

const state = {
  me: null,
  agents: new Map(),
  circuits: new Map(),
  tasks: new Map(),
  approvals: new Map(),
  plans: new Map(),
  results: new Map(),
  taskFilter: { status: "", agent_type: "" },
  feed: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function badge(status, label) {
  return el("span", { class: `badge s-${status}`, text: label || status.replace("_", " ") });
}

function canOperate() {
  return Boolean(state.me && state.me.permissions.includes("operate"));
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

function left(iso) {
  const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (seconds <= 0) return "expired";
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return h ? `${h} h ${m} min left` : m ? `${m} min ${s} s left` : `${s} s left`;
}

function shortId(id) {
  // The last characters: task ids begin with their creation time.
  return id ? id.slice(-8) : "—";
}

function report(error) {
  const message = error instanceof ApiError ? `${error.status}: ${error.message}` : String(error);
  $("feed-state").textContent = message;
}

// Keyed lists: only the entries whose data changed are built again, so that
// focus and typed text survive updates to other entries.
function renderKeyed(container, items, build) {
  const old = new Map();
  for (const child of [...container.children]) old.set(child.dataset.key, child);
  let previous = null;
  for (const item of items) {
    const signature = JSON.stringify(item.data);
    let node = old.get(item.key);
    if (!node || node.dataset.signature !== signature) {
      const fresh = build(item.data);
      fresh.dataset.key = item.key;
      fresh.dataset.signature = signature;
      if (node) node.replaceWith(fresh);
      node = fresh;
    }
    old.delete(item.key);
    const expected = previous ? previous.nextSibling : container.firstChild;
    if (expected !== node) container.insertBefore(node, expected);
    previous = node;
  }
  for (const node of old.values()) node.remove();
}

// Agents ---------------------------------------------------------------------

function callsInFlight() {
  const counts = new Map();
  for (const task of state.tasks.values()) {
    if (task.agent_id && IN_FLIGHT.has(task.status)) {
      counts.set(task.agent_id, (counts.get(task.agent_id) || 0) + 1);
    }
  }
  return counts;
}

function renderAgents() {
  const counts = callsInFlight();
  const agents = [...state.agents.values()].sort((a, b) => a.name.localeCompare(b.name));
  renderKeyed(
    document.querySelector("#agents tbody"),
    agents.map((agent) => ({
      key: agent.id,
      data: { agent, calls: counts.get(agent.id) || 0, circuit: state.circuits.get(agent.id) || "closed" },
    })),
    ({ agent, calls, circuit }) =>
      el(
        "tr",
        { "data-agent": agent.name },
        el("th", { scope: "row", text: agent.name }),
        el("td", { text: agent.type }),
        el("td", { class: "status" }, badge(agent.status)),
        el("td", { class: "last-seen", "data-at": agent.last_seen, text: ago(agent.last_seen) }),
        el("td", { text: String(calls) }),
        el("td", {}, badge(circuit)),
        el("td", { class: "caps", text: agent.capabilities.join(", ") }),
      ),
  );
  $("agents-empty").hidden = agents.length > 0;
}

// Tasks ----------------------------------------------------------------------

function taskShown(task) {
  const { status, agent_type } = state.taskFilter;
  return (!status || task.status === status) && (!agent_type || task.agent_type === agent_type);
}

function renderTasks() {
  const tasks = [...state.tasks.values()]
    .filter(taskShown)
    .sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""))
    .slice(0, 500);
  const operate = canOperate();
  renderKeyed(
    document.querySelector("#tasks tbody"),
    tasks.map((task) => ({ key: task.task_id, data: { task, operate } })),
    ({ task }) =>
      el(
        "tr",
        {},
        el("th", { scope: "row" }, el("code", { text: shortId(task.task_id), title: task.task_id })),
        el("td", { text: task.task_type }),
        el("td", {}, badge(task.status)),
        el("td", { text: task.agent_id ? shortId(task.agent_id) : "—" }),
        el("td", { text: task.created_at || "" }),
        el(
          "td",
          { class: "actions" },
          el("button", {
            type: "button",
            text: "Details",
            "aria-label": `Details of task ${task.task_id}`,
            onclick: () => showTask(task.task_id),
          }),
          operate && !FINAL_TASK.has(task.status)
            ? el("button", {
                type: "button",
                class: "danger",
                text: "Cancel",
                "aria-label": `Cancel task ${task.task_id}`,
                onclick: () => act(() => call("DELETE", `/tasks/${task.task_id}`)),
              })
            : null,
        ),
      ),
  );
}

async function showTask(taskId) {
  const detail = $("task-detail");
  try {
    const task = await call("GET", `/tasks/${taskId}`);
    const history = task.history || [];
    const parts = [
      el("h3", { text: `Task ${task.task_id}` }),
      el("p", {}, badge(task.status), ` ${task.task_type} for a ${task.agent_type} agent`),
      el("p", { class: "meta", text: `agent ${task.agent_id || "—"}, ${task.retry_count} retries` }),
      task.error ? el("p", { class: "error", text: task.error }) : null,
      el("h4", { text: "History" }),
      el(
        "ol",
        {},
        history.map((h) => el("li", {}, badge(h.status), ` ${h.at}${h.detail ? ` — ${h.detail}` : ""}`)),
      ),
      el("h4", { text: "Result" }),
      el("pre", { text: JSON.stringify(task.result, null, 2) }),
    ];
    detail.replaceChildren(...parts.filter(Boolean));
    detail.hidden = false;
    detail.querySelector("h3").setAttribute("tabindex", "-1");
    detail.querySelector("h3").focus();
  } catch (error) {
    report(error);
  }
}

// Approvals ------------------------------------------------------------------

function conflictsOf(approval) {
  const result = state.results.get(approval.coordination_id);
  if (!result) return [];
  return result.conflicts.filter((c) => c.recommendation_ids.includes(approval.recommendation_id));
}

function renderApprovals() {
  const order = (a) => (a.status === "pending" ? 0 : 1);
  const approvals = [...state.approvals.values()].sort(
    (a, b) => order(a) - order(b) || (b.created_at || "").localeCompare(a.created_at || ""),
  );
  const operate = canOperate();
  const me = state.me && state.me.name;
  renderKeyed(
    $("approvals"),
    approvals.map((approval) => ({
      key: approval.id,
      data: { approval, operate, conflicts: conflictsOf(approval) },
    })),
    ({ approval, conflicts }) => approvalCard(approval, conflicts, operate, me),
  );
  $("approvals-empty").hidden = approvals.length > 0;
  const pending = approvals.filter((a) => a.status === "pending").length;
  $("pending-count").textContent = pending ? String(pending) : "";
}

function approvalCard(approval, conflicts, operate, me) {
  const rec = approval.recommendation;
  const titleId = `approval-${approval.id}`;
  const pending = approval.status === "pending";
  const approvers = approval.approved_by.length ? approval.approved_by.join(", ") : "nobody yet";
  const card = el(
    "article",
    { class: `card risk-${approval.risk_level}`, "aria-labelledby": titleId, "data-approval": approval.id },
    el("h3", { id: titleId, text: rec.title || rec.action }),
    el("p", {}, badge(approval.status), " ", badge(approval.risk_level, `${approval.risk_level} risk`)),
    el("p", { class: "meta", text: `${rec.action} on ${rec.affected_resources.join(", ") || "—"} for ${approval.customer_id}` }),
    rec.description ? el("p", { text: rec.description }) : null,
    el("p", {
      class: "meta",
      text: `Recommended by the ${rec.agent_type} agent ${rec.agent_id}: saves ${rec.estimated_savings}, confidence ${rec.confidence}`,
    }),
    conflicts.length
      ? el(
          "ul",
          { class: "conflicts", "aria-label": "Conflicts" },
          conflicts.map((c) =>
            el("li", {
              text: `${c.type} conflict: ${c.description}. Kept ${c.kept.join(", ") || "—"}, dropped ${c.dropped.join(", ") || "—"}: ${c.resolution}`,
            }),
          ),
        )
      : el("p", { class: "meta", text: "No conflicts." }),
    el("p", {
      class: "approvers",
      text: `Approved by ${approvers} (${approval.approved_by.length} of ${approval.required_approvals})${
        pending && approval.required_approvals > 1 && approval.approved_by.length > 0
          ? " — needs another person"
          : ""
      }`,
    }),
    approval.rejection_reason
      ? el("p", { class: "error", text: `Rejected by ${approval.rejected_by}: ${approval.rejection_reason}` })
      : null,
    pending
      ? el("p", { class: "meta time-left", "data-until": approval.expires_at, text: left(approval.expires_at) })
      : null,
  );
  if (operate && pending) {
    const reasonId = `reason-${approval.id}`;
    const reason = el("input", { id: reasonId, name: "reason", type: "text", autocomplete: "off" });
    const mine = me && approval.approved_by.includes(me);
    card.append(
      el(
        "div",
        { class: "actions" },
        mine
          ? el("p", { class: "meta", text: "You approved this." })
          : el("button", {
              type: "button",
              class: "primary",
              text: "Approve",
              "aria-describedby": titleId,
              onclick: () => act(() => call("POST", `/coordination/approvals/${approval.id}/approve`, {})),
            }),
        el("label", { for: reasonId }, "Reason for rejecting", reason),
        el("button", {
          type: "button",
          class: "danger",
          text: "Reject",
          "aria-describedby": titleId,
          onclick: () => {
            if (!reason.value.trim()) {
              reason.focus();
              reason.setAttribute("aria-invalid", "true");
              return;
            }
            act(() => call("POST", `/coordination/approvals/${approval.id}/reject`, { reason: reason.value }));
          },
        }),
      ),
    );
  }
  return card;
}

// Plans ----------------------------------------------------------------------

function renderPlans() {
  const plans = [...state.plans.values()].sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
  const operate = canOperate();
  renderKeyed(
    $("plans"),
    plans.map((plan) => ({ key: plan.id, data: { plan, operate } })),
    ({ plan }) => {
      const titleId = `plan-${plan.id}`;
      const card = el(
        "article",
        { class: "card", "aria-labelledby": titleId, "data-plan": plan.id },
        el("h3", { id: titleId, text: `${plan.action} (${shortId(plan.id)})` }),
        el("p", {}, badge(plan.status), ` for ${plan.customer_id}`),
        el(
          "ol",
          { class: "steps", "aria-label": "Steps" },
          plan.steps.map((step) =>
            el(
              "li",
              { "data-step": step.task_type, "data-status": step.status },
              el("span", { text: `${step.index + 1}. ${step.task_type} (${step.agent_type})` }),
              badge(step.status),
              ROLLBACK_STEP.has(step.status) || step.rollback_task_id
                ? el("span", { class: "rollback", text: `rollback: ${step.rollback_task_type || "—"}` })
                : null,
              step.error ? el("span", { class: "meta", text: step.error }) : null,
            ),
          ),
        ),
        plan.error ? el("p", { class: "error", text: plan.error }) : null,
      );
      if (operate && plan.status === "pending") {
        card.append(
          el(
            "div",
            { class: "actions" },
            el("button", {
              type: "button",
              class: "primary",
              text: "Execute",
              "aria-describedby": titleId,
              onclick: () => act(() => call("POST", `/coordination/plans/${plan.id}/execute`)),
            }),
          ),
        );
      }
      return card;
    },
  );
  $("plans-empty").hidden = plans.length > 0;
}

// Actions and rendering --------------------------------------------------------

async function act(action) {
  try {
    await action();
  } catch (error) {
    report(error);
  }
}

let scheduled = false;
function render() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    renderAgents();
    renderTasks();
    renderApprovals();
    renderPlans();
  });
}

function tick() {
  for (const cell of document.querySelectorAll("[data-at]")) cell.textContent = ago(cell.dataset.at);
  for (const cell of document.querySelectorAll("[data-until]")) cell.textContent = left(cell.dataset.until);
}

// Loading and the feed ----------------------------------------------------------

async function loadResult(coordinationId) {
  if (state.results.has(coordinationId)) return;
  state.results.set(coordinationId, { conflicts: [] });
  try {
    const result = await call("GET", `/coordination/results/${coordinationId}`);
    state.results.set(coordinationId, result);
    for (const plan of result.execution_plans) if (!state.plans.has(plan.id)) state.plans.set(plan.id, plan);
    render();
  } catch (error) {
    state.results.delete(coordinationId);
  }
}

async function loadTasks() {
  const query = new URLSearchParams({ limit: "500" });
  for (const [name, value] of Object.entries(state.taskFilter)) if (value) query.set(name, value);
  const listed = await call("GET", `/tasks?${query}`);
  for (const task of listed.tasks) if (!state.tasks.has(task.task_id)) state.tasks.set(task.task_id, task);
}

async function loadAll() {
  const [agents, approvals, plans] = await Promise.all([
    call("GET", "/agents"),
    call("GET", "/coordination/approvals?limit=500"),
    call("GET", "/coordination/plans?limit=500"),
    loadTasks(),
  ]);
  for (const agent of agents.agents) state.agents.set(agent.id, agent);
  for (const plan of plans.plans) if (!state.plans.has(plan.id)) state.plans.set(plan.id, plan);
  for (const approval of approvals.approvals) state.approvals.set(approval.id, approval);
  render();
  await Promise.all([...new Set(approvals.approvals.map((a) => a.coordination_id))].map(loadResult));
}

function onEvent(topic, event) {
  if (topic === "agents") {
    if (event.kind === "removed") state.agents.delete(event.agent_id);
    else if (event.agent) state.agents.set(event.agent_id, event.agent);
    if (event.circuit) state.circuits.set(event.agent_id, event.circuit);
  } else if (topic === "tasks") {
    state.tasks.set(event.task.task_id, event.task);
  } else if (topic === "approvals") {
    state.approvals.set(event.approval.id, event.approval);
    loadResult(event.approval.coordination_id);
  } else if (topic === "plans") {
    state.plans.set(event.plan.id, event.plan);
  }
  render();
}

function onFeedState(name) {
  const badgeNode = $("feed-state");
  badgeNode.textContent = name;
  badgeNode.classList.toggle("live", name === "live");
}

async function reload() {
  for (const map of [state.agents, state.tasks, state.approvals, state.plans, state.results]) map.clear();
  await loadAll();
}

// Signing in, the tabs --------------------------------------------------------------

function selectTab(button) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab === button;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, index) => {
    tab.tabIndex = index === 0 ? 0 : -1;
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(index + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  });
}

async function open() {
  try {
    state.me = await call("GET", "/whoami");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      forgetKey();
      showSignIn("That key was not accepted.");
      return;
    }
    throw error;
  }
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = !state.me.role;
  document.body.dataset.role = state.me.role || "open";
  $("who").textContent = state.me.role
    ? `${state.me.name} (${state.me.role}${canOperate() ? "" : ": read only"})`
    : "access control is off";
  state.feed = new Feed({ onEvent, onState: onFeedState, onReset: () => reload() });
  state.feed.start();
  await loadAll();
}

function showSignIn(message = "") {
  $("app").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("api-key").focus();
}

function main() {
  setUpTabs();
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    keepKey($("api-key").value.trim());
    $("api-key").value = "";
    open().catch(report);
  });
  $("sign-out").addEventListener("click", () => {
    forgetKey();
    if (state.feed) state.feed.stop();
    location.reload();
  });
  $("task-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.taskFilter = { status: $("task-status").value, agent_type: $("task-agent-type").value };
    loadTasks().then(render, report);
  });
  setInterval(tick, 1000);
  if (storedKey() === null) showSignIn();
  else open().catch(report);
}

main();
