// The dashboard: reads the stats API (docs/stats-api.md) and draws it. Every figure shown is one
// the API returned, or a ratio of two of them; nothing is computed from raw events here.
'use strict';

// Errors the page met, for the end-to-end test to read (and for anyone in the console).
window.__meterErrors = [];
window.addEventListener('error', (e) => window.__meterErrors.push(String(e.message)));
window.addEventListener('unhandledrejection', (e) => window.__meterErrors.push(String(e.reason)));

const TOKEN_KEY = 'meter.adminToken';
const REFRESH_MS = 30000;
const MINUTE = 60e3;
const HOUR = 3600e3;
const DAY = 86400e3;
const RANGES = {
  '1h': { span: HOUR, bucket: 'minute', label: 'last hour' },
  '24h': { span: DAY, bucket: 'hour', label: 'last 24 hours' },
  '7d': { span: 7 * DAY, bucket: 'hour', label: 'last 7 days' },
  '30d': { span: 30 * DAY, bucket: 'day', label: 'last 30 days' },
};
const STEP_S = { minute: 60, hour: 3600, day: 86400 };
// Okabe–Ito: distinguishable with every common colour-vision deficiency. Grey is "other".
const PALETTE = ['#0072B2', '#E69F00', '#009E73', '#D55E00', '#56B4E9', '#CC79A7', '#F0E442', '#000000'];
const OTHER_COLOUR = '#999999';
const MAX_STACKED = 7;
const MAX_LATENCY_MODELS = 5;

const state = {
  range: '24h',
  custom: null, // {from: ms, to: ms}
  group: 'model',
  filters: {}, // dim -> {value, label}
  sort: { 'top-keys': { col: 'cost', desc: true }, 'top-models': { col: 'cost', desc: true } },
  tables: {},
  charts: {},
  generation: 0,
};

// ---- formatting ----------------------------------------------------------------------------

const intFmt = new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 });
const compactFmt = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 1 });
const usd2 = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD', minimumFractionDigits: 2, maximumFractionDigits: 2 });
// Below a dollar, three significant digits: $0.00951 rather than $0.01, never $0.00 for a cost.
const usdSmall = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD', maximumSignificantDigits: 3, minimumFractionDigits: 2 });

function usd(value) {
  const x = Number(value);
  if (!Number.isFinite(x) || x === 0) return '$0.00';
  return Math.abs(x) >= 1 ? usd2.format(x) : usdSmall.format(x);
}
function int(n) { return intFmt.format(n); }
function compact(n) { return Math.abs(n) < 1000 ? intFmt.format(n) : compactFmt.format(n); }
function pct(part, whole) {
  if (!whole) return '—';
  const r = (100 * part) / whole;
  if (r === 0) return '0%';
  return (r < 0.1 ? '<0.1' : r < 10 ? r.toFixed(1) : r.toFixed(0)) + '%';
}
function ms(v) {
  if (v == null) return '—';
  return v >= 1000 ? (v / 1000).toFixed(2) + ' s' : int(v) + ' ms';
}
function allTokens(r) {
  return r.input_tokens + r.output_tokens + r.cache_creation_input_tokens + r.cache_read_input_tokens;
}
function allInput(r) {
  return r.input_tokens + r.cache_creation_input_tokens + r.cache_read_input_tokens;
}

// ---- the API -------------------------------------------------------------------------------

class AuthNeeded extends Error {}

async function api(path, params) {
  const query = new URLSearchParams(params).toString();
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  const response = await fetch(query ? `${path}?${query}` : path, { headers });
  if (response.status === 401) throw new AuthNeeded();
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error && body.error.message;
    throw new Error(message || `${path} answered ${response.status}`);
  }
  return body;
}

/** The range as API parameters: `from`, `to` (custom only: presets end with the current minute,
 * the API's default), `bucket`, `tz` and the filters. */
function rangeParams() {
  const params = {};
  let from;
  let bucket;
  if (state.range === 'custom' && state.custom) {
    from = state.custom.from;
    params.to = new Date(state.custom.to).toISOString();
    bucket = bucketFor(state.custom.from, state.custom.to);
  } else {
    const range = RANGES[state.range];
    from = Date.now() - range.span;
    bucket = range.bucket;
  }
  params.from = new Date(from).toISOString();
  // Local days are built from hour cells, kept 90 days: older days are UTC days.
  const tz = localOffset();
  if (tz && Date.now() - from < 89 * DAY) params.tz = tz;
  for (const [dim, f] of Object.entries(state.filters)) params[dim] = f.value;
  return { params, bucket };
}

/** The finest bucket that keeps a custom range to a few hundred points and is still stored
 * (minute cells are kept 48 h, hour cells 90 days). */
function bucketFor(from, to) {
  const age = Date.now() - from;
  if (to - from <= 6 * HOUR && age < 47 * HOUR) return 'minute';
  if (to - from <= 14 * DAY && age < 89 * DAY) return 'hour';
  return 'day';
}

/** The browser's UTC offset as `±HH:MM`, so days are local; whole hours only (other offsets
 * need minute cells for local days, which the API keeps 48 h). */
function localOffset() {
  const minutes = -new Date().getTimezoneOffset();
  if (minutes === 0 || minutes % 60 !== 0) return null;
  const h = String(Math.abs(minutes) / 60).padStart(2, '0');
  return `${minutes > 0 ? '+' : '-'}${h}:00`;
}

// ---- refreshing ----------------------------------------------------------------------------

async function refresh() {
  const generation = ++state.generation;
  const { params, bucket } = rangeParams();
  const group = state.group;
  try {
    const [totals, series, keys, models, latency] = await Promise.all([
      api('/v1/usage', params),
      api('/v1/usage', { ...params, bucket, group_by: group }),
      api('/v1/usage', { ...params, group_by: 'key' }),
      api('/v1/usage', { ...params, group_by: 'model' }),
      api('/v1/latency', { ...params, bucket, group_by: 'model' }),
    ]);
    if (generation !== state.generation) return; // a newer refresh is under way
    showPage();
    hideError();
    renderTotals(totals);
    renderSeries(series, bucket, group);
    renderTable('top-keys', keys.rows, keyLabel, 'key');
    renderTable('top-models', models.rows, (r) => r.model, 'model');
    renderLatency(latency, bucket);
    document.getElementById('updated').textContent = new Date().toLocaleTimeString();
    document.getElementById('range-label').textContent = `${fmtTime(totals.from)} – ${fmtTime(totals.to)}`;
    document.getElementById('bucket-label').textContent = `one bar per ${bucket}`;
  } catch (e) {
    if (generation !== state.generation) return;
    if (e instanceof AuthNeeded) return askForToken();
    showError(e.message);
  }
  refreshStatus();
  refreshLimits();
}

async function refreshStatus() {
  try {
    const s = await api('/v1/status', {});
    setText('status-lag', s.lag == null ? '?' : int(s.lag));
    setText('status-pending', s.pending == null ? '?' : int(s.pending));
    setText('status-dead', int(s.dead_letters));
    document.getElementById('status-dead').classList.toggle('bad', s.dead_letters > 0);
    document.getElementById('status-lag').classList.toggle('bad', (s.lag || 0) > 10000);
  } catch (e) {
    if (!(e instanceof AuthNeeded)) setText('status-lag', 'unavailable');
  }
}

// ---- limits --------------------------------------------------------------------------------

// A limit is flagged from this share of its maximum on.
const FLAG_AT = 0.8;
const METRICS = {
  requests: { title: 'requests', fmt: int },
  tokens: { title: 'tokens', fmt: int },
  cost_usd: { title: 'cost', fmt: usd },
  budget_usd: { title: 'budget (lifetime)', fmt: usd },
  concurrency: { title: 'concurrent requests', fmt: int },
};

/** Each key's usage against its limits, from `/v1/limits` (the gateway's admin API). Its own
 * request, so an unreachable gateway costs this panel only. */
async function refreshLimits() {
  let answer;
  try {
    answer = await api('/v1/limits', {});
  } catch (e) {
    if (e instanceof AuthNeeded) return;
    return showLimits([], 0, e.message);
  }
  if (!answer.configured) {
    return showLimits([], 0, 'gateway not configured: start the aggregator with --gateway-url (METER_GATEWAY_URL) to see the keys\' limits here.', true);
  }
  const limited = answer.keys.filter((k) => k.limits.length > 0);
  const unlimited = answer.keys.length - limited.length;
  if (answer.keys.length === 0) return showLimits([], 0, 'The gateway has no keys yet.', true);
  if (limited.length === 0) return showLimits([], unlimited, 'No key has a limit.', true);
  showLimits(limited, unlimited, null);
}

/** The table, the count of keys without limits, and a message (an error unless `quiet`). */
function showLimits(keys, unlimited, message, quiet) {
  renderLimits(keys);
  const note = document.getElementById('limits-unlimited');
  note.hidden = keys.length === 0 || unlimited === 0;
  note.textContent = `${int(unlimited)} more ${unlimited === 1 ? 'key has' : 'keys have'} no limit.`;
  const el = document.getElementById('limits-message');
  el.hidden = message == null;
  el.textContent = message || '';
  el.classList.toggle('quiet', Boolean(quiet));
}

function limitTitle(l) {
  const title = (METRICS[l.metric] || { title: l.metric }).title;
  return l.window_secs == null ? title : `${title} per ${duration(l.window_secs)}`;
}

/** `45 s`, `10 min`, `1 h`, `1 h 30 min`, `1 d 6 h`: windows and reset times. */
function duration(secs) {
  if (secs < 60) return `${secs} s`;
  const minutes = Math.round(secs / 60);
  if (minutes < 60) return `${minutes} min`;
  if (minutes < 1440) {
    const h = Math.floor(minutes / 60);
    return minutes % 60 ? `${h} h ${minutes % 60} min` : `${h} h`;
  }
  const d = Math.floor(minutes / 1440);
  const h = Math.floor((minutes % 1440) / 60);
  return h ? `${d} d ${h} h` : `${d} d`;
}

function renderLimits(keys) {
  const table = document.getElementById('limits');
  table.textContent = '';
  if (keys.length === 0) return;
  const head = table.createTHead().insertRow();
  for (const title of ['key', 'limit', 'used / max', 'share', 'resets in']) {
    const th = document.createElement('th');
    th.textContent = title;
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const k of keys) {
    k.limits.forEach((l, i) => {
      const tr = body.insertRow();
      tr.className = 'static';
      tr.dataset.key = k.id;
      tr.dataset.metric = l.metric;
      if (i === 0) {
        const name = tr.insertCell();
        name.className = 'key';
        name.rowSpan = k.limits.length;
        name.textContent = k.disabled ? `${k.name} (disabled)` : k.name;
        name.title = k.id;
      }
      tr.insertCell().textContent = limitTitle(l);
      const fmt = (METRICS[l.metric] || { fmt: int }).fmt;
      const share = l.max > 0 ? l.used / l.max : l.used > 0 ? Infinity : 1;
      const flagged = share >= FLAG_AT;
      tr.classList.toggle('flagged', flagged);
      const use = tr.insertCell();
      use.className = 'use';
      const waiting = l.waiting ? ` · ${int(l.waiting)} waiting` : '';
      use.append(`${fmt(l.used)} / ${fmt(l.max)}${waiting}`);
      const meter = document.createElement('div');
      meter.className = 'meter';
      meter.setAttribute('role', 'img');
      meter.setAttribute('aria-label', `${pctOf(share)} used`);
      const fill = document.createElement('span');
      fill.style.width = `${Math.min(100, share * 100)}%`;
      meter.appendChild(fill);
      use.appendChild(meter);
      const shareCell = tr.insertCell();
      shareCell.className = 'share';
      shareCell.textContent = !flagged ? pctOf(share) : `⚠ ${pctOf(share)} ${share >= 1 ? 'at' : 'near'} limit`;
      tr.insertCell().textContent = l.resets_in_secs == null ? '—' : duration(l.resets_in_secs);
    });
  }
}

function pctOf(share) {
  if (!Number.isFinite(share)) return 'over';
  return `${Math.round(share * 100)}%`;
}

function fmtTime(iso) {
  return new Date(iso).toLocaleString('en-US', { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', hour12: false });
}

function setText(id, text, value) {
  const el = document.getElementById(id);
  el.textContent = text;
  if (value !== undefined) el.dataset.value = String(value);
}

// ---- totals --------------------------------------------------------------------------------

const ZERO = { requests: 0, errors: 0, input_tokens: 0, output_tokens: 0, cache_creation_input_tokens: 0, cache_read_input_tokens: 0, cost_usd: '0', cache_savings_usd: '0' };

function renderTotals(answer) {
  const t = answer.rows[0] || ZERO;
  setText('total-cost', usd(t.cost_usd), t.cost_usd);
  setText('total-requests', int(t.requests), t.requests);
  setText('total-errors', int(t.errors), t.errors);
  setText('total-error-rate', pct(t.errors, t.requests));
  setText('total-tokens', int(allTokens(t)), allTokens(t));
  setText('total-input', int(t.input_tokens), t.input_tokens);
  setText('total-output', int(t.output_tokens), t.output_tokens);
  setText('total-cache-write', int(t.cache_creation_input_tokens), t.cache_creation_input_tokens);
  setText('total-cache-read', int(t.cache_read_input_tokens), t.cache_read_input_tokens);
  setText('total-cache-share', pct(t.cache_read_input_tokens, allInput(t)));
  setText('total-cache-savings', usd(t.cache_savings_usd), t.cache_savings_usd);
}

// ---- charts --------------------------------------------------------------------------------

function keyLabel(r) {
  if (r.key == null) return '(no key)';
  return r.key_name || r.key;
}

/** Bucket starts (seconds) from the answer's `from` to its `to`, so empty buckets show as gaps
 * of zero rather than being skipped. */
function bucketAxis(answer, bucket) {
  const step = STEP_S[bucket];
  const from = Date.parse(answer.from) / 1000;
  const to = Date.parse(answer.to) / 1000;
  const offset = offsetSeconds(answer.from);
  const xs = new Set();
  let t = Math.floor((from + offset) / step) * step - offset;
  for (let n = 0; t < to && n < 5000; n++, t += step) xs.add(t);
  for (const r of answer.rows) xs.add(Date.parse(r.bucket_start) / 1000);
  return [...xs].sort((a, b) => a - b);
}

function offsetSeconds(iso) {
  const m = /([+-])(\d\d):(\d\d)$/.exec(iso);
  if (!m) return 0;
  return (m[1] === '+' ? 1 : -1) * (Number(m[2]) * 3600 + Number(m[3]) * 60);
}

/** Stacked bars of cost and of tokens per bucket, one colour per group (the biggest by cost,
 * the rest as "other"). */
function renderSeries(answer, bucket, group) {
  const xs = bucketAxis(answer, bucket);
  const at = new Map(xs.map((x, i) => [x, i]));
  const label = group === 'key' ? keyLabel : (r) => r.model;
  const byGroup = new Map();
  for (const r of answer.rows) {
    const name = label(r);
    let g = byGroup.get(name);
    if (!g) {
      g = { name, total: 0, cost: new Array(xs.length).fill(0), tokens: new Array(xs.length).fill(0) };
      byGroup.set(name, g);
    }
    const i = at.get(Date.parse(r.bucket_start) / 1000);
    g.cost[i] += Number(r.cost_usd);
    g.tokens[i] += allTokens(r);
    g.total += Number(r.cost_usd) + allTokens(r) * 1e-12; // ties (all unpriced) by tokens
  }
  let groups = [...byGroup.values()].sort((a, b) => b.total - a.total || a.name.localeCompare(b.name));
  if (groups.length > MAX_STACKED + 1) {
    const rest = groups.slice(MAX_STACKED);
    const other = { name: `other (${rest.length})`, cost: new Array(xs.length).fill(0), tokens: new Array(xs.length).fill(0), other: true };
    for (const g of rest) {
      g.cost.forEach((v, i) => { other.cost[i] += v; });
      g.tokens.forEach((v, i) => { other.tokens[i] += v; });
    }
    groups = groups.slice(0, MAX_STACKED).concat([other]);
  }
  groups.forEach((g, i) => { g.colour = g.other ? OTHER_COLOUR : PALETTE[i % PALETTE.length]; });
  if (group === 'model') state.modelColours = new Map(groups.map((g) => [g.name, g.colour]));
  stackedChart('chart-cost', xs, groups, 'cost', usd, bucket);
  stackedChart('chart-tokens', xs, groups, 'tokens', compact, bucket);
}

/** uPlot has no stacking of its own: each series is drawn as the running sum up to its group,
 * largest sum first, so every group shows as its own band of the bar; legends and hovers show
 * the group's own value. */
function stackedChart(id, xs, groups, field, fmt, bucket) {
  const el = document.getElementById(id);
  const sums = [];
  let running = new Array(xs.length).fill(0);
  for (const g of groups) {
    running = running.map((v, i) => v + g[field][i]);
    sums.push(running);
  }
  const order = groups.map((g, i) => i).reverse();
  const data = [xs, ...order.map((i) => sums[i])];
  const bars = uPlot.paths.bars({ size: [0.8, 40], gap: 1 });
  const series = [
    { label: 'Time', value: (u, v) => (v == null ? 'whole range' : fmtBucket(v, bucket)) },
    ...order.map((i) => ({
      label: groups[i].name,
      stroke: groups[i].colour,
      fill: groups[i].colour,
      width: 0,
      paths: bars,
      points: { show: false },
      // Hovering shows the bucket's value; otherwise the range's total.
      value: (u, v, s, idx) => fmt(idx == null ? groups[i][field].reduce((a, b) => a + b, 0) : groups[i][field][idx]),
    })),
  ];
  drawChart(id, el, data, series, (u, ticks) => ticks.map(fmt), groups.length === 0);
}

function fmtBucket(seconds, bucket) {
  const d = new Date(seconds * 1000);
  if (bucket === 'day') return d.toLocaleDateString('en-US', { month: 'short', day: 'numeric' });
  return d.toLocaleString('en-US', { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', hour12: false });
}

/** p50, p90 and p99 of latency and of time to first token, a colour per model (the busiest). */
function renderLatency(answer, bucket) {
  const xs = bucketAxis(answer, bucket);
  const at = new Map(xs.map((x, i) => [x, i]));
  const byModel = new Map();
  for (const r of answer.rows) {
    let m = byModel.get(r.model);
    if (!m) {
      m = { name: r.model, count: 0, latency: {}, ttft: {} };
      for (const q of ['p50', 'p90', 'p99']) {
        m.latency[q] = new Array(xs.length).fill(null);
        m.ttft[q] = new Array(xs.length).fill(null);
      }
      byModel.set(r.model, m);
    }
    const i = at.get(Date.parse(r.bucket_start) / 1000);
    m.count += r.count;
    for (const q of ['p50', 'p90', 'p99']) {
      m.latency[q][i] = r.latency_ms[q];
      m.ttft[q][i] = r.ttft_ms[q];
    }
  }
  const models = [...byModel.values()]
    .sort((a, b) => b.count - a.count || a.name.localeCompare(b.name))
    .slice(0, MAX_LATENCY_MODELS);
  const colours = modelColours();
  for (const [id, field] of [['chart-latency', 'latency'], ['chart-ttft', 'ttft']]) {
    const data = [xs];
    const series = [{ label: 'Time', value: (u, v) => (v == null ? 'hover for values' : fmtBucket(v, bucket)) }];
    models.forEach((m, i) => {
      const colour = colours.get(m.name) || PALETTE[i % PALETTE.length];
      for (const [q, dash] of [['p50', []], ['p90', [6, 4]], ['p99', [2, 3]]]) {
        data.push(m[field][q]);
        series.push({ label: `${m.name} ${q}`, stroke: colour, width: q === 'p50' ? 2 : 1.5, dash, points: { size: 4 }, value: (u, v) => (v == null ? '' : ms(v)) });
      }
    });
    drawChart(id, document.getElementById(id), data, series, (u, ticks) => ticks.map(ms), models.length === 0);
  }
}

/** The colours the cost chart gave to models, so a model keeps its colour across charts. */
function modelColours() {
  return state.modelColours || new Map();
}

function drawChart(id, el, data, series, yValues, empty) {
  if (state.charts[id]) {
    state.charts[id].destroy();
    delete state.charts[id];
  }
  el.textContent = '';
  if (empty) {
    const p = document.createElement('p');
    p.className = 'empty';
    p.textContent = 'No requests in this range.';
    el.appendChild(p);
    return;
  }
  const opts = {
    width: chartWidth(el),
    height: 240,
    series,
    cursor: { points: { show: false } },
    scales: { x: { time: true } },
    axes: [
      { stroke: '#5b6672', grid: { stroke: '#eef0f3' } },
      { stroke: '#5b6672', grid: { stroke: '#eef0f3' }, values: yValues, size: 70 },
    ],
    legend: { live: true },
  };
  state.charts[id] = new uPlot(opts, data, el);
}

function chartWidth(el) {
  return Math.max(260, el.clientWidth || el.parentElement.clientWidth - 28);
}

window.addEventListener('resize', () => {
  for (const [id, chart] of Object.entries(state.charts)) {
    chart.setSize({ width: chartWidth(document.getElementById(id)), height: 240 });
  }
});

// ---- tables --------------------------------------------------------------------------------

const COLUMNS = [
  { id: 'name', title: 'name', value: (r, label) => label(r), text: (v) => v },
  { id: 'requests', title: 'requests', value: (r) => r.requests, text: int },
  { id: 'tokens', title: 'tokens', value: allTokens, text: int },
  { id: 'cost', title: 'cost', value: (r) => Number(r.cost_usd), text: usd },
  { id: 'errors', title: 'error rate', value: (r) => (r.requests ? r.errors / r.requests : 0), text: (v, r) => pct(r.errors, r.requests) },
  { id: 'cache', title: 'input from cache', value: (r) => (allInput(r) ? r.cache_read_input_tokens / allInput(r) : 0), text: (v, r) => pct(r.cache_read_input_tokens, allInput(r)) },
  { id: 'savings', title: 'saved by cache', value: (r) => Number(r.cache_savings_usd), text: usd },
];

function renderTable(id, rows, label, dim) {
  state.tables[id] = { rows, label, dim };
  const table = document.getElementById(id);
  const sort = state.sort[id];
  const column = COLUMNS.find((c) => c.id === sort.col);
  const sorted = rows.slice().sort((a, b) => {
    const x = column.value(a, label);
    const y = column.value(b, label);
    const order = typeof x === 'string' ? x.localeCompare(y) : x - y;
    return sort.desc ? -order : order;
  });
  table.textContent = '';
  const head = table.createTHead().insertRow();
  for (const c of COLUMNS) {
    const th = document.createElement('th');
    th.textContent = c.title;
    th.dataset.col = c.id;
    th.setAttribute('aria-sort', c.id === sort.col ? (sort.desc ? 'descending' : 'ascending') : 'none');
    th.addEventListener('click', () => {
      state.sort[id] = { col: c.id, desc: c.id === sort.col ? !sort.desc : c.id !== 'name' };
      const t = state.tables[id];
      renderTable(id, t.rows, t.label, t.dim);
    });
    head.appendChild(th);
  }
  const body = table.createTBody();
  if (sorted.length === 0) {
    const td = body.insertRow().insertCell();
    td.colSpan = COLUMNS.length;
    td.className = 'empty';
    td.textContent = 'No requests in this range.';
    return;
  }
  for (const r of sorted) {
    const tr = body.insertRow();
    for (const c of COLUMNS) {
      const td = tr.insertCell();
      td.textContent = c.text(c.value(r, label), r);
    }
    const value = r[dim];
    tr.firstChild.title = value == null ? 'requests without a key' : value;
    if (value == null) {
      tr.className = 'static';
      continue;
    }
    tr.dataset.value = value;
    tr.addEventListener('click', () => setFilter(dim, value, label(r)));
  }
}

// ---- controls ------------------------------------------------------------------------------

function setFilter(dim, value, label) {
  state.filters[dim] = { value, label };
  renderFilters();
  refresh();
}

function renderFilters() {
  const bar = document.getElementById('filters');
  bar.textContent = '';
  const entries = Object.entries(state.filters);
  bar.hidden = entries.length === 0;
  if (entries.length === 0) return;
  const intro = document.createElement('span');
  intro.textContent = 'Showing only';
  bar.appendChild(intro);
  for (const [dim, f] of entries) {
    const chip = document.createElement('span');
    chip.className = 'chip';
    chip.id = `filter-${dim}`;
    chip.textContent = `${dim}: ${f.label}`;
    const clear = document.createElement('button');
    clear.type = 'button';
    clear.textContent = '×';
    clear.title = `show every ${dim}`;
    clear.setAttribute('aria-label', `remove the ${dim} filter`);
    clear.addEventListener('click', () => {
      delete state.filters[dim];
      renderFilters();
      refresh();
    });
    chip.appendChild(clear);
    bar.appendChild(chip);
  }
}

function pressed(container, attr, value) {
  for (const b of document.querySelectorAll(`#${container} button`)) {
    b.setAttribute('aria-pressed', String(b.dataset[attr] === value));
  }
}

function localInput(ms) {
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * MINUTE);
  return d.toISOString().slice(0, 16);
}

function setup() {
  for (const b of document.querySelectorAll('#ranges button')) {
    b.addEventListener('click', () => {
      state.range = b.dataset.range;
      pressed('ranges', 'range', state.range);
      const custom = document.getElementById('custom-range');
      custom.hidden = state.range !== 'custom';
      if (state.range === 'custom') {
        const now = Date.now();
        const from = document.getElementById('custom-from');
        const to = document.getElementById('custom-to');
        if (!from.value) from.value = localInput(now - DAY);
        if (!to.value) to.value = localInput(now);
        if (!state.custom) return;
      }
      refresh();
    });
  }
  document.getElementById('custom-range').addEventListener('submit', (e) => {
    e.preventDefault();
    const from = new Date(document.getElementById('custom-from').value).getTime();
    const to = new Date(document.getElementById('custom-to').value).getTime();
    if (!(from < to)) return showError('The custom range must end after it starts.');
    state.custom = { from, to };
    refresh();
  });
  for (const b of document.querySelectorAll('#grouping button')) {
    b.addEventListener('click', () => {
      state.group = b.dataset.group;
      pressed('grouping', 'group', state.group);
      refresh();
    });
  }
  document.getElementById('login').addEventListener('submit', (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById('token').value.trim());
    refresh();
  });
  pressed('ranges', 'range', state.range);
  pressed('grouping', 'group', state.group);
  refresh();
  setInterval(refresh, REFRESH_MS);
}

function askForToken() {
  const tried = sessionStorage.getItem(TOKEN_KEY) !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('main').hidden = true;
  document.getElementById('login').hidden = false;
  document.getElementById('login-error').hidden = !tried;
  if (tried) document.getElementById('token').value = '';
  document.getElementById('token').focus();
}

function showPage() {
  document.getElementById('login').hidden = true;
  document.getElementById('main').hidden = false;
}

function showError(message) {
  const el = document.getElementById('error');
  el.textContent = message;
  el.hidden = false;
}

function hideError() {
  document.getElementById('error').hidden = true;
}

setup();
