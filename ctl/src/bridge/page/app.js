// Coral scan progress page: a small JSON-RPC 2.0 client over the bridge's WebSocket, live
// progress from `scan.subscribe`, the connection state from `bridge.subscribe`, and automatic
// reconnection with a fresh snapshot (scan.active, scan.list, library.list) each time the bridge
// or corald comes back. Plain JavaScript, no dependencies, no network access beyond the bridge.
'use strict';

(() => {
  const SUBPROTOCOL = 'coral.jsonrpc';
  const TOKEN_PREFIX = 'coral.token.';
  const CALL_TIMEOUT_MS = 30000;
  const MIN_RETRY_MS = 500;
  const MAX_RETRY_MS = 8000;
  const KEEP_FINISHED_MS = 120000;
  const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- state
  const state = {
    ws: null,
    nextId: 1,
    calls: new Map(), // id -> {resolve, reject, timer}
    retryMs: MIN_RETRY_MS,
    retryTimer: null,
    info: null, // bridge.info
    daemonConnected: false,
    scans: new Map(), // request_id -> ScanProgress (active and recently finished)
    finishedAt: new Map(), // request_id -> Date.now() when it ended
    libraries: [],
    recent: [],
    token: null,
    refreshing: false,
  };

  // ---------------------------------------------------------------- token
  const TOKEN_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // valid in a subprotocol entry
  function loadToken() {
    const params = new URLSearchParams(location.search);
    const fromUrl = params.get('token');
    if (fromUrl) {
      state.token = fromUrl;
      try { sessionStorage.setItem('coral.token', fromUrl); } catch (_) { /* storage off */ }
      params.delete('token');
      const q = params.toString();
      history.replaceState(null, '', location.pathname + (q ? '?' + q : '') + location.hash);
    } else {
      try { state.token = sessionStorage.getItem('coral.token'); } catch (_) { state.token = null; }
    }
  }
  function setToken(t) {
    state.token = t || null;
    try {
      if (t) sessionStorage.setItem('coral.token', t); else sessionStorage.removeItem('coral.token');
    } catch (_) { /* storage off */ }
  }

  // ---------------------------------------------------------------- DOM helpers
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return '—';
    s = Math.max(0, Math.round(s));
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    const pad = (n) => String(n).padStart(2, '0');
    return hh > 0 ? `${hh}:${pad(mm)}:${pad(ss)}` : `${mm}:${pad(ss)}`;
  }
  function fmtRate(r, unit) {
    if (r === null || r === undefined || !isFinite(r)) return null;
    return `${r >= 10 ? Math.round(r) : r.toFixed(1)} ${unit}/s`;
  }
  function fmtTime(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return isNaN(d) ? '—' : d.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
  }
  function humanTrigger(t) { return String(t || '').replace(/_/g, ' '); }
  function tookSeconds(p) {
    if (!p.finished_at) return null;
    return (new Date(p.finished_at) - new Date(p.started_at)) / 1000;
  }

  // ---------------------------------------------------------------- connection indicator
  // `text` goes in the indicator (announced politely); `detail`, the reason, in the banner below.
  function setConn(kind, text, detail) {
    const el = $('conn');
    if (el.dataset.state !== kind || $('conn-text').textContent !== text) {
      el.dataset.state = kind;
      $('conn-text').textContent = text;
    }
    const banner = $('conn-detail');
    banner.hidden = !detail;
    banner.textContent = detail || '';
  }
  function showAction(text, kind, requestId) {
    const el = $('action-msg');
    el.textContent = text;
    el.dataset.kind = kind || 'info';
    if (requestId) el.dataset.requestId = requestId; else delete el.dataset.requestId;
  }

  // ---------------------------------------------------------------- JSON-RPC client
  function wsUrl() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let url = `${proto}//${location.host}/ws`;
    if (state.token && !TOKEN_CHARS.test(state.token)) {
      url += '?token=' + encodeURIComponent(state.token);
    }
    return url;
  }
  function protocols() {
    const p = [SUBPROTOCOL];
    if (state.token && TOKEN_CHARS.test(state.token)) p.push(TOKEN_PREFIX + state.token);
    return p;
  }
  function call(method, params) {
    return new Promise((resolve, reject) => {
      const ws = state.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN) {
        reject(new Error('not connected to the bridge'));
        return;
      }
      const id = state.nextId++;
      const timer = setTimeout(() => {
        state.calls.delete(id);
        reject(new Error(`${method}: no answer within ${CALL_TIMEOUT_MS / 1000} s`));
      }, CALL_TIMEOUT_MS);
      state.calls.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params: params === undefined ? [] : params }));
    });
  }
  function onMessage(ev) {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (_) { return; }
    if (msg && msg.id !== undefined && msg.id !== null && state.calls.has(msg.id)) {
      const c = state.calls.get(msg.id);
      state.calls.delete(msg.id);
      clearTimeout(c.timer);
      if (msg.error) {
        const e = new Error(msg.error.message || 'error');
        e.code = msg.error.code;
        c.reject(e);
      } else {
        c.resolve(msg.result);
      }
      return;
    }
    if (msg && msg.method && msg.params) {
      const result = msg.params.result;
      if (msg.method === 'scan.progress' && result) onProgress(result);
      else if (msg.method === 'bridge.status' && result) onBridgeStatus(result);
    }
  }
  function failCalls(reason) {
    for (const c of state.calls.values()) { clearTimeout(c.timer); c.reject(new Error(reason)); }
    state.calls.clear();
  }

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    let ws;
    try {
      ws = new WebSocket(wsUrl(), protocols());
    } catch (e) {
      scheduleReconnect(String(e.message || e));
      return;
    }
    state.ws = ws;
    ws.addEventListener('open', () => {
      if (state.ws !== ws) return;
      state.retryMs = MIN_RETRY_MS;
      setConn('connecting', 'Connected to the bridge; waiting for corald…');
      start().catch((e) => {
        showAction(`Could not start: ${e.message}`, 'error');
      });
    });
    ws.addEventListener('message', onMessage);
    ws.addEventListener('close', () => {
      if (state.ws !== ws) return;
      state.ws = null;
      state.daemonConnected = false;
      failCalls('the connection to the bridge closed');
      scheduleReconnect('the connection to the bridge was lost');
    });
  }
  function scheduleReconnect(why) {
    const delay = state.retryMs + Math.floor(Math.random() * 250);
    state.retryMs = Math.min(state.retryMs * 2, MAX_RETRY_MS);
    setConn('offline', `Bridge unreachable; retrying in ${Math.ceil(delay / 1000)} s`, `The page lost its connection to the bridge: ${why}.`);
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(connect, delay);
  }
  function reconnectNow() {
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close();
    failCalls('reconnecting');
    state.retryMs = MIN_RETRY_MS;
    connect();
  }

  // ---------------------------------------------------------------- session start
  async function start() {
    state.info = await call('bridge.info');
    $('version').textContent = `coralctl bridge ${state.info.version}`;
    if (state.token && !state.info.authorized) {
      showAction('The access token was not accepted.', 'error');
      setToken(null);
    } else if (state.token && $('action-msg').textContent === 'Checking the token…') {
      showAction('Token accepted: scans can be started from this page.', 'info');
    }
    renderAccess();
    renderLibraries();
    // Progress first, so nothing falls between the snapshot and the updates.
    await call('scan.subscribe', []);
    await call('bridge.subscribe', []);
  }

  // ---------------------------------------------------------------- notifications
  function onBridgeStatus(s) {
    state.daemonConnected = !!s.connected;
    if (s.connected) {
      setConn('ok', 'Live: connected to corald');
      refresh();
    } else {
      setConn('daemon-down', 'corald unreachable; reconnecting…', s.error ? `The bridge cannot reach corald: ${s.error}` : null);
    }
  }
  function onProgress(p) {
    const prev = state.scans.get(p.request_id);
    state.scans.set(p.request_id, p);
    const ended = TERMINAL.has(p.phase);
    if (ended && !state.finishedAt.has(p.request_id)) {
      state.finishedAt.set(p.request_id, Date.now());
      refreshLists();
    } else if (!prev) {
      refreshLists();
    }
    renderScan(p);
    // Keep the tables in step with the live state.
    const i = state.recent.findIndex((r) => r.request_id === p.request_id);
    if (i >= 0) { state.recent[i] = p; renderRecent(); }
    const lib = state.libraries.find((l) => l.last_scan && l.last_scan.request_id === p.request_id);
    if (lib) {
      const changed = lib.last_scan.phase !== p.phase;
      lib.last_scan = p;
      if (changed) renderLibraries(); // rows hold buttons: redraw only when the phase changes
    }
  }

  // Fresh snapshot: after each (re)connection to corald.
  async function refresh() {
    if (state.refreshing) return;
    state.refreshing = true;
    try {
      const active = await call('scan.active', []);
      const ids = new Set(active.map((p) => p.request_id));
      for (const p of active) onProgress(p);
      // Scans that were running before and are no longer active ended meanwhile.
      for (const [id, p] of state.scans) {
        if (!TERMINAL.has(p.phase) && !ids.has(id)) {
          try {
            onProgress(await call('scan.get', { request_id: id }));
          } catch (_) {
            state.scans.delete(id);
            removeScanCard(id);
          }
        }
      }
      await refreshLists();
    } catch (e) {
      if (state.daemonConnected) showAction(`Could not load the current state: ${e.message}`, 'error');
    } finally {
      state.refreshing = false;
    }
    renderActiveEmpty();
  }
  let listsPending = null;
  function refreshLists() {
    if (listsPending) return listsPending;
    listsPending = (async () => {
      try {
        const [libs, recent] = await Promise.all([call('library.list', []), call('scan.list', { limit: 15 })]);
        state.libraries = libs;
        state.recent = recent;
        renderLibraries();
        renderRecent();
      } catch (_) {
        /* shown by the indicator; the next reconnection refreshes */
      } finally {
        listsPending = null;
      }
    })();
    return listsPending;
  }

  // ---------------------------------------------------------------- actions
  async function startScan(lib, full, button) {
    button.disabled = true;
    try {
      const r = await call('scan.start', { library: lib.id, full });
      const what = full ? 'Full rescan' : 'Scan';
      showAction(
        r.merged ? `${what} of ${lib.path} joined a scan already queued.` : `${what} of ${lib.path} queued.`,
        'info',
        r.request_id,
      );
    } catch (e) {
      showAction(`Could not start the scan: ${e.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  }
  async function cancelScan(p, button) {
    button.disabled = true;
    try {
      await call('scan.cancel', { request_id: p.request_id });
      showAction(`Cancellation requested for the scan of ${p.library_path}.`, 'info', p.request_id);
    } catch (e) {
      showAction(`Could not cancel: ${e.message}`, 'error');
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- rendering
  function renderAccess() {
    const info = state.info;
    const form = $('token-form');
    const note = $('access-note');
    if (!info) return;
    form.hidden = !(info.token_configured && !info.authorized);
    if (!info.token_configured) {
      note.hidden = false;
      note.textContent = 'Read-only: start the bridge with a token (--token or CORAL_BRIDGE_TOKEN) to start scans from this page.';
    } else {
      note.hidden = true;
    }
  }

  function cardId(id) { return `scan-${id}`; }
  function removeScanCard(id) {
    const el = document.getElementById(cardId(id));
    if (el) el.remove();
    renderActiveEmpty();
  }
  function renderActiveEmpty() {
    $('active-empty').hidden = $('active').children.length > 0;
  }

  function phaseRow(kind, label, p) {
    const rowId = `${cardId(p.request_id)}-${kind}`;
    const indexing = kind === 'indexing';
    // The phase's counts: what is settled (done, unchanged or skipped, failed) of how many.
    const total = indexing ? p.tracks_expected : p.embeddings_expected;
    const failed = indexing ? p.tracks_failed : p.embeddings_failed;
    const done = failed + (indexing ? p.tracks_indexed + p.tracks_unchanged : p.embeddings_done + p.embeddings_skipped);
    let pct = indexing ? p.indexing_percent : p.embedding_percent;
    const rate = indexing ? fmtRate(p.tracks_per_second, 'files') : fmtRate(p.embeddings_per_second, 'tracks');
    let detail;
    if (total === null || total === undefined) {
      if (indexing) detail = p.phase === 'queued' ? 'waiting to start' : `discovering: ${p.files_discovered} files found`;
      else detail = TERMINAL.has(p.phase) ? 'not run (embeddings are off)' : 'waiting for indexing';
    } else if (indexing) {
      detail = `${done} / ${total} files · ${p.tracks_indexed} indexed · ${p.tracks_unchanged} unchanged` +
        (p.tracks_removed ? ` · ${p.tracks_removed} removed` : '');
    } else {
      detail = `${done} / ${total} tracks · ${p.embeddings_done} embedded · ${p.embeddings_skipped} skipped`;
    }
    if ((pct === null || pct === undefined) && total !== null && total !== undefined) {
      pct = total === 0 ? 100 : (100 * done) / total;
    }
    const known = pct !== null && pct !== undefined;
    const shown = known ? (pct >= 100 ? 100 : Math.floor(pct)) : null;
    const running = (kind === 'indexing' && (p.phase === 'discovering' || p.phase === 'indexing')) ||
      (kind === 'embedding' && p.phase === 'embedding');
    const fill = h('div', { class: 'fill' });
    const bar = h('div', {
      class: 'bar',
      role: 'progressbar',
      'aria-labelledby': `${rowId}-label ${cardId(p.request_id)}-lib`,
      'aria-valuemin': 0,
      'aria-valuemax': 100,
      'aria-valuenow': known ? shown : null,
      'aria-valuetext': known ? `${shown} percent, ${detail}` : detail,
      'data-done': shown === 100 ? 'true' : 'false',
      'data-indeterminate': !known && running ? 'true' : 'false',
      'data-count': done,
      'data-total': total === null || total === undefined ? '' : total,
    }, fill);
    if (known) fill.style.width = `${Math.min(100, Math.max(0, pct))}%`;
    const extra = [];
    if (running && rate) extra.push(rate);
    if (running && p.eta_seconds !== null && p.eta_seconds !== undefined) extra.push(`ETA ${fmtDuration(p.eta_seconds)}`);
    const detailEl = h('span', { class: 'detail' }, detail, extra.length ? ' · ' + extra.join(' · ') : '');
    if (failed > 0) detailEl.append(' · ', h('span', { class: 'failed' }, `${failed} failed`));
    return h('div', { class: 'phase-row', id: rowId, 'data-bar': kind },
      h('span', { class: 'label', id: `${rowId}-label` }, label),
      bar,
      h('span', { class: 'pct', 'aria-hidden': 'true' }, known ? `${shown} %` : '—'),
      detailEl,
    );
  }

  function renderScan(p) {
    const list = $('active');
    const id = cardId(p.request_id);
    const authorized = !!(state.info && state.info.authorized);
    const reembed = p.trigger === 'model_change';
    const meta = [humanTrigger(p.trigger), p.mode, p.path ? `only ${p.path}` : null, p.resumed ? 'resumed' : null]
      .filter(Boolean).join(' · ');
    const head = h('div', { class: 'scan-head' },
      h('span', { class: 'lib', id: `${id}-lib` }, p.library_path),
      h('span', { class: 'badge', 'data-phase': p.phase }, p.phase),
      h('span', { class: 'meta' }, `${meta} · started ${fmtTime(p.started_at)}`),
      h('span', { class: 'spacer' }),
    );
    if (authorized && !TERMINAL.has(p.phase)) {
      const btn = h('button', { type: 'button', class: 'secondary', 'aria-label': `Cancel the scan of ${p.library_path}` }, 'Cancel');
      btn.addEventListener('click', () => cancelScan(p, btn));
      head.append(btn);
    }
    const card = h('li', {
      class: 'scan', id, 'data-request-id': p.request_id, 'data-library-id': p.library_id, 'data-phase': p.phase,
      'aria-label': `Scan of ${p.library_path}`,
    },
    head,
    // A re-embed job after a model change has no indexing, only its embedding counts.
    reembed ? null : phaseRow('indexing', 'Indexing', p),
    phaseRow('embedding', reembed ? 'Re-embedding' : 'Embedding', p),
    p.error ? h('p', { class: 'error' }, p.error) : null,
    );
    const old = document.getElementById(id);
    if (old) {
      old.replaceWith(card);
    } else {
      list.prepend(card);
    }
    renderActiveEmpty();
  }

  function renderLibraries() {
    const tbody = $('libraries').querySelector('tbody');
    const authorized = !!(state.info && state.info.authorized);
    const rows = state.libraries.map((lib) => {
      const last = lib.last_scan;
      const lastText = last ? `${last.phase} · ${fmtTime(last.finished_at || last.started_at)}` : 'never';
      const actions = h('td', { class: 'actions' });
      if (authorized) {
        const scan = h('button', { type: 'button', 'data-action': 'scan', 'aria-label': `Scan ${lib.path} now` }, 'Scan now');
        scan.addEventListener('click', () => startScan(lib, false, scan));
        const full = h('button', { type: 'button', class: 'secondary', 'data-action': 'full-scan', 'aria-label': `Full rescan of ${lib.path}` }, 'Full rescan');
        full.addEventListener('click', () => startScan(lib, true, full));
        actions.append(scan, full);
      }
      return h('tr', { 'data-library-id': lib.id },
        h('td', { class: 'path' }, lib.path),
        h('td', { class: 'num', 'data-field': 'tracks' }, lib.track_count),
        h('td', { class: 'num' }, lib.failed_count),
        h('td', {}, last ? h('span', { class: 'result', 'data-phase': last.phase }, lastText) : lastText),
        actions,
      );
    });
    tbody.replaceChildren(...rows);
    $('libraries-empty').hidden = state.libraries.length > 0 || !state.daemonConnected;
  }

  function renderRecent() {
    const tbody = $('recent').querySelector('tbody');
    const rows = state.recent.map((p) => h('tr', { 'data-request-id': p.request_id },
      h('td', {}, fmtTime(p.started_at)),
      h('td', { class: 'path' }, p.library_path + (p.path ? `/${p.path}` : '')),
      h('td', {}, humanTrigger(p.trigger) + (p.mode === 'full' ? ' (full)' : '')),
      h('td', {}, h('span', { class: 'result', 'data-phase': p.phase }, p.phase)),
      h('td', { class: 'num' }, p.tracks_indexed),
      h('td', { class: 'num' }, p.tracks_unchanged),
      h('td', { class: 'num' }, p.tracks_removed),
      h('td', { class: 'num' }, p.tracks_failed),
      h('td', { class: 'num' }, fmtDuration(tookSeconds(p))),
    ));
    tbody.replaceChildren(...rows);
    $('recent-empty').hidden = state.recent.length > 0 || !state.daemonConnected;
  }

  // Finished scans leave the active list after a while.
  setInterval(() => {
    const now = Date.now();
    for (const [id, at] of state.finishedAt) {
      if (now - at > KEEP_FINISHED_MS) {
        state.finishedAt.delete(id);
        state.scans.delete(id);
        removeScanCard(id);
      }
    }
  }, 5000);

  // ---------------------------------------------------------------- boot
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('token-input').value.trim();
    if (!v) return;
    $('token-input').value = '';
    setToken(v);
    showAction('Checking the token…', 'info');
    reconnectNow();
  });
  loadToken();
  connect();
})();
