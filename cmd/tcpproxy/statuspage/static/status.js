// The tcpproxy status page: polls /api/status and redraws. Every value
// from the instance goes into the page as text (textContent), never as
// markup: member names and errors come from other machines.
'use strict';

const POLL_MS = 1000;
const SVG = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else e.setAttribute(k, v);
  }
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmtBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  if (i === 0) return n + 'B';
  return (v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)) + units[i];
}

function fmtRate(v, bytes) {
  if (bytes) return fmtBytes(Math.round(v)) + '/s';
  return (v < 10 ? v.toFixed(1) : v.toFixed(0)) + '/s';
}

function fmtAge(sec) {
  sec = Math.floor(sec);
  if (sec < 60) return sec + 's';
  if (sec < 3600) return Math.floor(sec / 60) + 'm' + String(sec % 60).padStart(2, '0') + 's';
  if (sec < 172800) return Math.floor(sec / 3600) + 'h' + String(Math.floor(sec / 60) % 60).padStart(2, '0') + 'm';
  return Math.floor(sec / 86400) + 'd' + String(Math.floor(sec / 3600) % 24).padStart(2, '0') + 'h';
}

function fmtRTT(sec) {
  if (!sec) return '–';
  if (sec < 0.001) return (sec * 1e6).toFixed(0) + 'µs';
  if (sec < 1) return (sec * 1e3).toFixed(2) + 'ms';
  return sec.toFixed(2) + 's';
}

// fill replaces tbody's rows; each row is [key, cells], a cell being
// {field, text, cls}. An empty list shows note.
function fill(table, keyName, rows, note) {
  const body = $(table).tBodies[0];
  const out = [];
  for (const [key, cells] of rows) {
    const tr = el('tr');
    tr.dataset[keyName] = key;
    for (const c of cells) {
      const td = el('td', c.cls ? { class: c.cls } : {}, c.text);
      td.dataset.field = c.field;
      if (c.title) td.title = c.title;
      tr.append(td);
    }
    out.push(tr);
  }
  if (out.length === 0) {
    const td = el('td', { class: 'empty', colspan: $(table).tHead.rows[0].cells.length }, note);
    const tr = el('tr');
    tr.append(td);
    out.push(tr);
  }
  body.replaceChildren(...out);
}

const cell = (field, text, cls, title) => ({ field, text, cls, title });
const num = (field, text) => cell(field, text, 'num');

function renderInstance(s) {
  const i = s.instance;
  $('iid').textContent = i.iid;
  document.title = 'tcpproxy ' + i.iid;
  const facts = [
    ['role', i.role || '–'], ['state', i.ready ? 'ready' : 'not ready'], ['bind IP', i.bindIP || '–'],
    ['network', i.network], ['transport', i.transport], ['listen', i.listen || '–'],
    ['version', i.version], ['up', fmtAge(i.uptimeSeconds)],
  ];
  const p = $('instance');
  p.replaceChildren();
  facts.forEach(([k, v], n) => {
    if (n) p.append(' · ');
    p.append(k + ' ');
    p.append(el('b', { 'data-field': k.replace(' ', '') }, v));
  });
}

function renderMembers(s) {
  const rows = s.members.map((m) => [m.iid, [
    cell('iid', m.iid), cell('role', m.role), cell('ip', m.ip), cell('addr', m.addr || '–'),
    cell('state', m.state, 'state-' + m.state), num('sessions', m.sessions),
    cell('note', m.lastError ? m.failures + ' failed dials: ' + m.lastError : '', 'wrap'),
  ]]);
  fill('members', 'iid', rows, 'no members: the membership lists nobody');
}

function renderSessions(s) {
  const rows = s.sessions.map((x, n) => [x.peer + '#' + n, [
    cell('peer', x.peer), cell('net', x.net), cell('dir', x.dialed ? 'out' : 'in'),
    cell('identity', x.identity, 'wrap'), num('age', fmtAge(x.ageSeconds)), num('rtt', fmtRTT(x.rttSeconds)),
    cell('bytesSent', fmtBytes(x.bytesSent), 'num', x.bytesSent + ' bytes'),
    cell('bytesReceived', fmtBytes(x.bytesReceived), 'num', x.bytesReceived + ' bytes'),
    num('streams', x.streams),
  ]]);
  fill('sessions', 'peer', rows, 'no sessions');
}

function channelAddr(c) {
  if (c.listen.length === 1 && !c.connect) return c.listen[0];
  const imp = c.listen.length + (c.listen.length === 1 ? ' impostor' : ' impostors');
  if (c.listen.length && c.connect) return '→' + c.connect + ' + ' + imp;
  if (c.listen.length) return imp;
  return c.connect ? '→' + c.connect : '–';
}

function renderChannels(s) {
  const rows = s.channels.map((c) => [c.name, [
    cell('name', c.name), cell('kind', c.kind + (c.mode ? '/' + c.mode : '') + (c.target && c.target !== c.name ? ' →' + c.target : '')),
    cell('address', channelAddr(c), 'wrap'),
    cell('members', c.members.map((m) => m.iid + (m.state && m.state !== 'self' ? ' (' + m.state + ')' : '')).join(', ') || '–', 'wrap'),
    num('active', c.active), num('connections', c.connections), num('failed', c.failed), num('refused', c.refused),
    cell('bytesOut', fmtBytes(c.bytesOut), 'num', c.bytesOut + ' bytes'),
    cell('bytesIn', fmtBytes(c.bytesIn), 'num', c.bytesIn + ' bytes'),
  ]]);
  fill('channels', 'channel', rows, 'no channels');
}

// renderMesh draws this instance in the middle and every member or peer
// around it, joined by a line styled by how it is reached.
function renderMesh(s) {
  const g = $('mesh');
  const W = 480, H = 300, cx = W / 2, cy = H / 2;
  const nodes = new Map();
  for (const m of s.members) {
    if (m.iid !== s.instance.iid) nodes.set(m.iid, { state: m.state, sessions: m.sessions });
  }
  for (const x of s.sessions) {
    if (!nodes.has(x.peer)) nodes.set(x.peer, { state: 'up', sessions: 0, guest: true });
    const n = nodes.get(x.peer);
    if (n.guest) n.sessions++;
  }
  const kids = [];
  const list = [...nodes.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1));
  const r = Math.min(W, H) / 2 - 34;
  list.forEach(([iid, n], k) => {
    const a = (2 * Math.PI * k) / list.length - Math.PI / 2;
    const x = cx + r * 1.45 * Math.cos(a), y = cy + r * Math.sin(a);
    kids.push(svg('line', { x1: cx, y1: cy, x2: x, y2: y, class: n.state }));
    if (n.sessions) {
      const lx = cx + 0.62 * (x - cx) + 4, ly = cy + 0.62 * (y - cy);
      kids.push(svg('text', { x: lx, y: ly, class: 'count' }, n.sessions + (n.sessions === 1 ? ' session' : ' sessions')));
    }
    const t = svg('title', {}, iid + ': ' + n.state + (n.guest ? ' (a peer that is not a member)' : ''));
    const c = svg('circle', { cx: x, cy: y, r: 9, class: n.state, 'data-iid': iid });
    c.append(t);
    // The name goes outside the ring, away from the line.
    kids.push(c, svg('text', { x, y: Math.sin(a) < -0.3 ? y - 14 : y + 22 }, iid));
  });
  kids.push(svg('circle', { cx, cy, r: 13, class: 'self' }), svg('text', { x: cx, y: cy + 28 }, s.instance.iid + ' (this)'));
  if (list.length === 0) kids.push(svg('text', { x: cx, y: cy - 30 }, 'no other instance known'));
  g.replaceChildren(...kids);
}

// rates turns a counter series into per-second rates between samples.
function rates(times, v) {
  const out = [];
  for (let i = 1; i < v.length; i++) {
    const dt = (times[i] - times[i - 1]) / 1000;
    out.push(dt > 0 ? Math.max(0, v[i] - v[i - 1]) / dt : 0);
  }
  return out;
}

// chart draws series (with labels) as lines over the history's span.
function chart(title, series, bytes, spanSec) {
  const W = 300, H = 70, top = 12;
  const box = el('div', { class: 'chart' });
  box.append(el('h3', {}, title));
  const max = Math.max(1e-9, ...series.flatMap((s) => s.v));
  const s = svg('svg', { width: W, height: H + top + 12, viewBox: `0 0 ${W} ${H + top + 12}` });
  s.append(svg('line', { x1: 0, y1: top + H, x2: W, y2: top + H, class: 'axis' }));
  s.append(svg('text', { x: 2, y: 9 }, 'max ' + fmtRate(max, bytes)));
  s.append(svg('text', { x: 2, y: top + H + 11 }, spanSec < 90 ? '−' + Math.round(spanSec) + ' s' : '−' + Math.round(spanSec / 60) + ' min'));
  s.append(svg('text', { x: W - 22, y: top + H + 11 }, 'now'));
  series.forEach((ser, k) => {
    const n = ser.v.length;
    if (n < 2) return;
    const pts = ser.v.map((y, i) => `${((i / (n - 1)) * W).toFixed(1)},${(top + H - (y / max) * H).toFixed(1)}`);
    s.append(svg('polyline', { points: pts.join(' '), class: 's' + k }));
  });
  box.append(s);
  const legend = el('div', { class: 'legend' });
  series.forEach((ser, k) => {
    const last = ser.v.length ? ser.v[ser.v.length - 1] : 0;
    legend.append(el('span', { class: 's' + k }, '— ' + ser.label + ' ' + fmtRate(last, bytes)));
  });
  box.append(legend);
  return box;
}

function renderCharts(s) {
  const h = s.history;
  if (!h) return;
  const span = h.times.length > 1 ? (h.times[h.times.length - 1] - h.times[0]) / 1000 : 0;
  const boxes = [];
  for (const c of s.channels) {
    const x = h.channels[c.name];
    if (!x) continue;
    const conns = chart(c.name + ': connections/s', [
      { label: 'new', v: rates(h.times, x.connections) },
      { label: 'failed+refused', v: rates(h.times, x.failed.map((f, i) => f + x.refused[i])) },
    ], false, span);
    const bytes = chart(c.name + ': bytes/s', [
      { label: 'out', v: rates(h.times, x.bytesOut) },
      { label: 'in', v: rates(h.times, x.bytesIn) },
    ], true, span);
    conns.dataset.channel = bytes.dataset.channel = c.name;
    boxes.push(conns, bytes);
  }
  if (boxes.length === 0) boxes.push(el('p', { class: 'hint' }, 'charts appear after a few seconds of samples'));
  $('charts').replaceChildren(...boxes);
}

function setConn(ok, why) {
  const c = $('conn');
  c.className = 'conn ' + (ok ? 'ok' : 'bad');
  c.textContent = ok ? 'live: updated every ' + POLL_MS / 1000 + 's' : 'the instance does not answer: ' + why;
}

async function poll() {
  try {
    const r = await fetch('/api/status?history=1', { cache: 'no-store' });
    if (!r.ok) throw new Error(r.status + ' ' + r.statusText);
    const s = await r.json();
    renderInstance(s);
    renderMembers(s);
    renderSessions(s);
    renderChannels(s);
    renderMesh(s);
    renderCharts(s);
    $('updated').textContent = new Date(s.time).toLocaleTimeString();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    setConn(true);
  } catch (e) {
    setConn(false, e.message);
  }
  setTimeout(poll, POLL_MS);
}

poll();
