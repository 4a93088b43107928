// Drives the bridge's live progress page in headless Chromium (Debian's /usr/bin/chromium via
// playwright-core). Run by tests/tests/bridge.rs, which owns corald and answers the STEP lines:
//
//   node progress.mjs PAGE_URL OUT_DIR FILES
//
// PAGE_URL carries the token (?token=…); FILES is the size of the library the test registered.
// The script: opens the page, starts a full rescan with the library's button, checks the bars
// move and reach 100 % with the right counts, prints "STEP kill-corald", waits for the red
// indicator, prints "STEP start-corald", waits for the page to recover by itself (green
// indicator, fresh snapshot), starts an incremental scan and checks it too. Screenshots go to
// OUT_DIR (progress-running.png, progress-offline.png, progress.png). Exit status 0 on success;
// the reason for a failure on stderr.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, outDir, filesArg] = process.argv.slice(2);
if (!url || !outDir || !filesArg) {
  console.error('usage: node progress.mjs PAGE_URL OUT_DIR FILES');
  process.exit(2);
}
const FILES = Number(filesArg);
const executablePath = process.env.CORAL_CHROMIUM || '/usr/bin/chromium';
const log = (...a) => console.error(new Date().toISOString(), ...a);
const step = (name) => console.log(`STEP ${name}`);

const profile = mkdtempSync(join(tmpdir(), 'coral-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-quic',
      '--no-first-run',
      '--disable-sync',
    ],
    viewport: { width: 1200, height: 860 },
    colorScheme: 'light',
    locale: 'en-GB',
    timezoneId: 'UTC',
  });
  await run(context);
  log('all checks passed');
} catch (e) {
  log('FAILED:', e && e.stack ? e.stack : e);
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}

async function run(context) {
  const page = context.pages()[0] || (await context.newPage());
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log(`page ${m.type()}: ${m.text()}`);
  });
  // Nothing but the bridge may be contacted (the page must work offline).
  const origin = new URL(url).origin;
  const foreign = [];
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (u.origin !== origin && u.origin !== origin.replace(/^http/, 'ws')) foreign.push(r.url());
  });

  // 0. Without a token the page is read-only and asks for one; a wrong token is refused, the
  // right one typed into the form unlocks the buttons.
  const token = new URL(url).searchParams.get('token');
  const plain = new URL(url);
  plain.search = '';
  await page.goto(plain.href);
  await expectConn(page, 'ok', 30000);
  const row = page.locator('#libraries tbody tr').first();
  await row.waitFor({ timeout: 30000 });
  await page.locator('#token-form').waitFor({ state: 'visible', timeout: 10000 });
  if (await row.locator('button').count()) throw new Error('scan buttons shown without a token');
  await page.getByLabel('Access token').fill('not-the-token');
  await page.getByRole('button', { name: 'Unlock scanning' }).click();
  await page.waitForFunction(() => /not accepted/.test(document.getElementById('action-msg').textContent), null, { timeout: 30000 });
  await page.getByLabel('Access token').fill(token);
  await page.getByRole('button', { name: 'Unlock scanning' }).click();
  await row.locator('button[data-action="full-scan"]').waitFor({ timeout: 30000 });
  await page.locator('#token-form').waitFor({ state: 'hidden', timeout: 10000 });
  log('typed token accepted');

  // The token in the page's URL works too, and leaves the address bar.
  const other = await context.newPage();
  await other.goto(url);
  await expectConn(other, 'ok', 30000);
  await other.locator('#libraries tbody tr button[data-action="scan"]').waitFor({ timeout: 30000 });
  if (new URL(other.url()).searchParams.has('token')) throw new Error('the token stayed in the address bar');
  await other.close();
  log('token from the URL accepted and removed from the address bar');

  // Record every value the indexing bars take.
  await page.evaluate(() => {
    window.__samples = {};
    const record = () => {
      for (const card of document.querySelectorAll('#active li.scan')) {
        const bar = card.querySelector('.phase-row[data-bar="indexing"] .bar');
        const v = bar && bar.getAttribute('aria-valuenow');
        if (v === null || v === undefined) continue;
        const id = card.dataset.requestId;
        (window.__samples[id] ||= []).push(Number(v));
      }
    };
    new MutationObserver(record).observe(document.getElementById('active'), {
      subtree: true, childList: true, attributes: true,
    });
  });

  // 1. A full rescan started from the page.
  const first = await startScan(page, row, 'full-scan');
  log('full rescan', first);
  const card = page.locator(`#active li.scan[data-request-id="${first}"]`);
  await card.waitFor({ timeout: 30000 });
  // Mid-way (a bar strictly between 0 and 100 %), or already over on a fast machine: the
  // recorded samples below say whether the bar moved.
  await page.waitForFunction((id) => {
    const s = window.__samples[id] || [];
    const c = document.querySelector(`#active li.scan[data-request-id="${id}"]`);
    return s.some((v) => v > 0 && v < 100) || (c && c.dataset.phase === 'completed');
  }, first, { timeout: 120000 });
  await page.screenshot({ path: join(outDir, 'progress-running.png'), fullPage: true });
  await waitPhase(page, first, 'completed', 300000);
  const samples = await page.evaluate((id) => window.__samples[id] || [], first);
  const middle = [...new Set(samples.filter((v) => v > 0 && v < 100))];
  log(`indexing bar values: ${samples.length} samples, ${middle.length} distinct values between 0 and 100`);
  if (middle.length < 2) throw new Error(`the bar did not move: ${JSON.stringify(samples)}`);
  for (let i = 1; i < samples.length; i++) {
    if (samples[i] < samples[i - 1]) throw new Error(`the bar went back: ${JSON.stringify(samples)}`);
  }
  await expectBar(page, first, 'indexing', FILES, `${FILES} / ${FILES} files`);
  await expectText(card, `${FILES} indexed`);
  await expectText(card.locator('.badge'), 'completed');
  // Libraries and recent scans refresh when a scan ends.
  await page.waitForFunction((n) => {
    const td = document.querySelector('#libraries tbody tr td[data-field="tracks"]');
    return td && Number(td.textContent) === n;
  }, FILES, { timeout: 30000 });
  await page.locator(`#recent tbody tr[data-request-id="${first}"]`).waitFor({ timeout: 30000 });

  // 2. corald goes away and comes back; the page recovers by itself.
  step('kill-corald');
  await expectConn(page, 'daemon-down', 30000);
  const downText = await page.locator('#conn-text').textContent();
  log('indicator while corald is down:', downText);
  await page.screenshot({ path: join(outDir, 'progress-offline.png'), fullPage: true });
  step('start-corald');
  await expectConn(page, 'ok', 180000);
  log('indicator recovered:', await page.locator('#conn-text').textContent());
  // A fresh snapshot after the reconnect: the lists are reloaded from the new corald.
  await page.waitForFunction((n) => {
    const td = document.querySelector('#libraries tbody tr td[data-field="tracks"]');
    return td && Number(td.textContent) === n;
  }, FILES, { timeout: 30000 });

  // 3. Subscriptions resumed: an incremental scan shows up and completes.
  const second = await startScan(page, page.locator('#libraries tbody tr').first(), 'scan');
  log('incremental scan', second);
  await waitPhase(page, second, 'completed', 300000);
  await expectBar(page, second, 'indexing', FILES, `${FILES} / ${FILES} files`);
  await expectText(page.locator(`#active li.scan[data-request-id="${second}"]`), `${FILES} unchanged`);
  await expectConn(page, 'ok', 1000);
  await page.screenshot({ path: join(outDir, 'progress.png'), fullPage: true });

  if (pageErrors.length) throw new Error(`errors in the page: ${pageErrors.join('; ')}`);
  if (foreign.length) throw new Error(`the page contacted other hosts: ${foreign.join(', ')}`);
  step('done');
}

async function expectConn(page, state, timeout) {
  try {
    await page.locator(`#conn[data-state="${state}"]`).waitFor({ timeout });
  } catch (e) {
    const now = await page.locator('#conn').getAttribute('data-state').catch(() => '?');
    const text = await page.locator('#conn-text').textContent().catch(() => '?');
    throw new Error(`the indicator never showed "${state}" (it shows "${now}": ${text})`);
  }
}

async function startScan(page, row, action) {
  await page.evaluate(() => { delete document.getElementById('action-msg').dataset.requestId; });
  await row.locator(`button[data-action="${action}"]`).click();
  const handle = await page.waitForFunction(() => {
    const el = document.getElementById('action-msg');
    if (el.dataset.kind === 'error') return `error: ${el.textContent}`;
    return el.dataset.requestId || null;
  }, null, { timeout: 30000 });
  const id = await handle.jsonValue();
  if (String(id).startsWith('error:')) throw new Error(`starting the scan failed: ${id}`);
  return id;
}

async function waitPhase(page, id, phase, timeout) {
  try {
    await page.locator(`#active li.scan[data-request-id="${id}"][data-phase="${phase}"]`).waitFor({ timeout });
  } catch (e) {
    const now = await page.locator(`#active li.scan[data-request-id="${id}"]`).getAttribute('data-phase').catch(() => 'no card');
    throw new Error(`scan ${id} never reached ${phase} on the page (it shows ${now})`);
  }
}

async function expectBar(page, id, kind, total, text) {
  const bar = page.locator(`#active li.scan[data-request-id="${id}"] .phase-row[data-bar="${kind}"] .bar`);
  const [now, count, tot] = await Promise.all([
    bar.getAttribute('aria-valuenow'), bar.getAttribute('data-count'), bar.getAttribute('data-total'),
  ]);
  if (now !== '100') throw new Error(`${kind} bar of ${id} ends at ${now} %, not 100 %`);
  if (Number(count) !== total || Number(tot) !== total) {
    throw new Error(`${kind} bar of ${id} counts ${count} / ${tot}, expected ${total} / ${total}`);
  }
  const row = page.locator(`#active li.scan[data-request-id="${id}"] .phase-row[data-bar="${kind}"]`);
  await expectText(row, text);
  await expectText(row.locator('.pct'), '100 %');
}

async function expectText(locator, text) {
  const got = await locator.first().textContent();
  if (!got || !got.includes(text)) throw new Error(`expected "${text}" in "${got}"`);
}
