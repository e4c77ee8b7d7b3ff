// The booking page: sign up or in, charge points, queue, pick a seat, hold it and pay.
//
// Plain JavaScript, no framework, no build step, nothing fetched but this origin's API.
// Secrets (the apiKey, the access token) live in memory only: never in localStorage,
// sessionStorage or cookies. Text that came from a user (names, titles, venues) is only
// ever set through textContent (or `new Option(text)`), never parsed as markup.
'use strict';

(() => {
  const API = '/api/v1';
  const SEAT_REFRESH_MS = 2000; // the seat map refreshes itself this often
  const QUEUE_POLL_MS = 2000; // polling, when the live stream is not available
  const STREAM_RETRY_MS = 15000; // how long to poll before trying the stream again
  const STREAM_STALL_MS = 45000; // no byte for this long (heartbeats come every 15 s): reconnect
  const RENEW_BEFORE_MS = 60000; // renew the access token this long before it expires
  const HISTORY_LIMIT = 20;
  const MAX_CHARGE = 10000000;

  /** Everything the page knows; the DOM is drawn from it by the render functions. */
  const state = {
    session: 0, // bumped on sign-in/out: answers to an older session are dropped
    apiKey: null,
    access: null, // { token, expiresAt (ms) }
    renewing: null, // the access-token renewal in flight (one at a time)
    user: null, // { id, name | null }
    balance: null,
    history: null, // null until loaded
    queue: null, // the latest token view
    queueStatus: null, // null | 'WAITING' | 'ACTIVE' | 'ENDED'
    queueGen: 0, // bumped to stop the loop that follows the queue
    streamAbort: null, // AbortController of the open event stream
    bookingShown: false,
    concerts: [],
    concert: null,
    schedules: [],
    schedule: null,
    seats: [],
    seatSeq: 0, // newest seat-map request; older answers are dropped
    holding: false, // a hold request is in flight
    hold: null, // { reservation, idempotencyKey, heldUntil (ms) }
    mine: new Set(), // "scheduleId#seatNumber" of seats this user held or bought here
    busy: new Set(), // buttons whose action is in flight
    backgroundError: null, // the shown error, when a background refresh set it
    clockOffset: 0, // server clock minus ours (ms), from the Date header
    timers: { renew: 0, seats: 0, countdown: 0, active: 0 },
  };

  /** The page's elements, by id (filled in init). */
  const els = {};

  // ---------------------------------------------------------------------------
  // HTTP

  /** An API failure: `message` is the problem's `detail`, readable as is. */
  class ApiError extends Error {
    constructor(message, { status = 0, code = '', field = null } = {}) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.code = code;
      this.field = field;
    }
  }

  /** The answer belongs to a session that has ended: dropped silently. */
  function stale() {
    const error = new Error('stale answer');
    error.name = 'AbortError';
    return error;
  }

  /**
   * One request to the API; resolves to the Response when it succeeded.
   * Adds the headers (`auth`: 'access' (default) | 'apikey' | 'none'; `queue`: send the
   * Queue-Token), renews the access token once on 401 UNAUTHENTICATED and retries, and
   * throws an ApiError carrying the problem's detail, code and status otherwise.
   */
  async function request(path, opts = {}) {
    const { method = 'GET', body, auth = 'access', queue = false, headers = {},
      accept = 'application/json', signal, retried = false } = opts;
    const session = state.session;
    const h = new Headers(headers);
    h.set('Accept', accept);
    if (body !== undefined) h.set('Content-Type', 'application/json');
    if (auth === 'access') {
      if (!state.access) throw new ApiError('Please sign in first.');
      h.set('Authorization', `Bearer ${state.access.token}`);
    } else if (auth === 'apikey') {
      h.set('Authorization', `Bearer ${opts.apiKey}`);
    }
    let queueToken = null;
    if (queue) {
      if (!state.queue) throw new ApiError('Join the queue first.');
      queueToken = state.queue.token;
      h.set('Queue-Token', String(queueToken));
    }

    let res;
    try {
      res = await fetch(API + path, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: 'no-store',
        credentials: 'same-origin',
      });
    } catch (err) {
      if (err && err.name === 'AbortError') throw err;
      throw new ApiError('Network error: the server could not be reached. Check the connection and try again.',
        { code: 'NETWORK' });
    }
    if (session !== state.session) throw stale();
    noteServerClock(res);
    if (res.ok) return res;

    const problem = await readProblem(res);
    if (session !== state.session) throw stale();
    if (res.status === 401 && problem.code === 'UNAUTHENTICATED' && auth === 'access'
        && !retried && state.apiKey) {
      await renewAccessToken();
      return request(path, { ...opts, retried: true });
    }
    if (queue && problem.code === 'QUEUE_TOKEN_INVALID' && state.queue
        && String(state.queue.token) === String(queueToken)) {
      queueEnded('Your queue token has ended. Join the queue again to keep booking.');
    }
    throw new ApiError(problem.detail, problem);
  }

  /** `request`, then the answer's JSON (null when it has no body). */
  async function api(path, opts) {
    const session = state.session;
    const res = await request(path, opts);
    const text = await res.text();
    if (session !== state.session) throw stale();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch {
      throw new ApiError('The server sent an answer this page cannot read.', { status: res.status });
    }
  }

  /** The readable parts of an error answer (problem+json), with a fallback. */
  async function readProblem(res) {
    let problem = null;
    if (/json/i.test(res.headers.get('Content-Type') || '')) {
      try {
        problem = await res.json();
      } catch {
        problem = null;
      }
    }
    const text = (value) => (typeof value === 'string' && value.trim() ? value : '');
    const p = problem && typeof problem === 'object' ? problem : {};
    const detail = text(p.detail) || text(p.title)
      || (res.statusText ? `${res.status} ${res.statusText}` : `The request failed (HTTP ${res.status}).`);
    return { status: res.status, code: text(p.code), field: text(p.field) || null, detail };
  }

  /** Keeps how far the server's clock is from ours, for countdowns and expiries. */
  function noteServerClock(res) {
    const date = Date.parse(res.headers.get('Date') || '');
    if (Number.isNaN(date)) return;
    const offset = date - Date.now();
    // The header has a 1 s resolution: correct only a real skew.
    state.clockOffset = Math.abs(offset) > 2000 ? offset : 0;
  }

  const serverNow = () => Date.now() + state.clockOffset;
  const enc = (id) => encodeURIComponent(String(id));
  const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });
  const sameId = (a, b) => a != null && b != null && String(a) === String(b);
  const mineKey = (scheduleId, seatNumber) => `${String(scheduleId)}#${String(seatNumber)}`;

  /** A fresh idempotency key (randomUUID needs a secure context; fall back when absent). */
  function newIdempotencyKey() {
    if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  /** The `sub` claim of a JWT (not verified: the server does that), or null. */
  function jwtSubject(jwt) {
    try {
      const part = String(jwt).split('.')[1];
      const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && claims.sub != null ? claims.sub : null;
    } catch {
      return null;
    }
  }

  // ---------------------------------------------------------------------------
  // Messages

  /** Shows an error in the one alert region (AbortErrors are not errors). */
  function showError(err, { background = false } = {}) {
    if (!err || err.name === 'AbortError') return;
    const message = typeof err === 'string' ? err : (err.message || 'Something went wrong.');
    els.error.textContent = message;
    state.backgroundError = background ? message : null;
  }

  function clearError() {
    els.error.textContent = '';
    state.backgroundError = null;
  }

  /** Clears the shown error if a background refresh set it (the next one worked). */
  function clearBackgroundError() {
    if (state.backgroundError !== null && els.error.textContent === state.backgroundError) clearError();
  }

  function notify(message) {
    els.notice.textContent = message;
  }

  /** Runs a button's action: the button is disabled while it runs, errors are shown. */
  async function withBusy(button, work) {
    if (state.busy.has(button)) return;
    clearError();
    state.busy.add(button);
    button.setAttribute('aria-busy', 'true');
    renderControls();
    try {
      await work();
    } catch (err) {
      showError(err);
    } finally {
      state.busy.delete(button);
      button.removeAttribute('aria-busy');
      renderControls();
    }
  }

  // ---------------------------------------------------------------------------
  // Formatting

  const pad2 = (n) => String(n).padStart(2, '0');

  /** mm:ss of a duration in ms (never negative). */
  function formatMmSs(ms) {
    const s = Math.max(0, Math.ceil(ms / 1000));
    return `${pad2(Math.floor(s / 60))}:${pad2(s % 60)}`;
  }

  function formatWait(seconds) {
    const s = Math.max(0, Math.round(Number(seconds)));
    if (s < 60) return `about ${s} s`;
    return `about ${Math.floor(s / 60)} min ${pad2(s % 60)} s`;
  }

  function formatTime(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
  }

  function formatClock(iso) {
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString();
  }

  function scheduleLabel(s) {
    const seats = Number.isFinite(s.availableSeats) && Number.isFinite(s.totalSeats)
      ? ` · ${s.availableSeats} of ${s.totalSeats} seats free` : '';
    return `${formatTime(s.startsAt)}${seats}`;
  }

  // ---------------------------------------------------------------------------
  // Render

  function renderAll() {
    renderSession();
    renderPoints();
    renderQueue();
    renderSeats();
    renderHold();
    renderControls();
  }

  function renderSession() {
    const user = state.user;
    els.sessionLine.hidden = !user;
    els.who.textContent = !user ? '' : (user.name ? user.name : String(user.id));
    els.pointsSection.hidden = !user;
    els.queueSection.hidden = !user;
    els.bookingSection.hidden = !(user && state.bookingShown);
  }

  function renderPoints() {
    els.balance.textContent = state.balance == null ? '' : String(state.balance);
    const entries = Array.isArray(state.history) ? state.history : [];
    els.history.replaceChildren(...entries.map(historyItem));
    els.historyEmpty.hidden = !(Array.isArray(state.history) && entries.length === 0);
  }

  function historyItem(entry) {
    const li = document.createElement('li');
    const amount = Math.abs(Number(entry.amount));
    const sign = entry.kind === 'USE' ? '−' : '+';
    const kind = { CHARGE: 'Charge', USE: 'Payment', REFUND: 'Refund' }[entry.kind] || String(entry.kind);
    li.textContent = `${kind} ${sign}${amount} points · balance ${entry.balanceAfter} · ${formatTime(entry.createdAt)}`;
    li.dataset.kind = String(entry.kind);
    return li;
  }

  function renderQueue() {
    const status = state.queueStatus;
    const view = state.queue;
    const waiting = status === 'WAITING' && view;
    els.queueStatus.textContent = status || '';
    els.queueSection.dataset.status = status || 'NONE';
    els.queuePosition.textContent = waiting && view.position != null ? String(view.position) : '';
    els.queueWait.textContent = waiting && view.estimatedWaitSeconds != null
      ? formatWait(view.estimatedWaitSeconds) : '';
    els.queueButton.textContent = status === 'ENDED' ? 'Queue again' : 'Join the queue';
  }

  /** Draws the seat map: one button per seat, kept (not rebuilt) across refreshes. */
  function renderSeats() {
    const seats = state.schedule ? state.seats : [];
    let buttons = els.seatMap.querySelectorAll('button.seat');
    const sameLayout = buttons.length === seats.length
      && seats.every((seat, i) => buttons[i].dataset.seat === String(seat.seatNumber));
    if (!sameLayout) {
      els.seatMap.replaceChildren(...seats.map((seat) => {
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'seat';
        button.dataset.seat = String(seat.seatNumber);
        button.textContent = String(seat.seatNumber);
        return button;
      }));
      buttons = els.seatMap.querySelectorAll('button.seat');
    }
    const active = state.queueStatus === 'ACTIVE';
    els.seatMap.setAttribute('aria-disabled', String(!active));
    seats.forEach((seat, i) => {
      const button = buttons[i];
      const status = String(seat.status);
      const mine = status !== 'AVAILABLE' && state.mine.has(mineKey(state.schedule.id, seat.seatNumber));
      button.dataset.status = status;
      if (mine) button.dataset.mine = 'true';
      else delete button.dataset.mine;
      button.disabled = !(active && status === 'AVAILABLE');
      let label = `Seat ${seat.seatNumber}, ${status.toLowerCase()}`;
      if (mine) label += status === 'SOLD' ? ' to you' : ' by you';
      if (status === 'AVAILABLE' && seat.price != null) label += `, ${seat.price} points`;
      button.setAttribute('aria-label', label);
      button.title = seat.price != null ? `${seat.price} points` : '';
    });
  }

  function renderHold() {
    const hold = state.hold;
    els.holdSection.hidden = !hold;
    if (!hold) return;
    els.holdSeat.textContent = String(hold.reservation.seatNumber);
    els.holdPrice.textContent = String(hold.reservation.price);
    els.holdCountdown.textContent = Number.isFinite(hold.heldUntil)
      ? formatMmSs(hold.heldUntil - serverNow()) : '--:--';
  }

  /** Enables or disables the controls from the state. */
  function renderControls() {
    const signedIn = Boolean(state.user);
    const busy = (button) => state.busy.has(button);
    const status = state.queueStatus;
    const active = status === 'ACTIVE';
    els.signupButton.disabled = busy(els.signupButton);
    els.signinButton.disabled = busy(els.signinButton);
    els.chargeButton.disabled = !signedIn || busy(els.chargeButton);
    els.queueButton.disabled = !signedIn || busy(els.queueButton) || status === 'WAITING' || active;
    els.concertSelect.disabled = !active;
    els.scheduleSelect.disabled = !active;
    els.payButton.disabled = !state.hold || busy(els.payButton);
    els.cancelButton.disabled = !state.hold || busy(els.cancelButton) || busy(els.payButton);
  }

  // ---------------------------------------------------------------------------
  // Session: sign up, sign in, access tokens

  function fetchAccessToken(apiKey) {
    return api('/auth/tokens', { method: 'POST', auth: 'apikey', apiKey });
  }

  /** Keeps a new access token and schedules its renewal before it expires. */
  function setAccess(grant) {
    const expiresAt = Date.parse(grant.expiresAt);
    state.access = { token: grant.accessToken, expiresAt };
    clearTimeout(state.timers.renew);
    const wait = Number.isNaN(expiresAt) ? 5 * 60000 : Math.max(5000, expiresAt - serverNow() - RENEW_BEFORE_MS);
    state.timers.renew = setTimeout(() => { renewAccessToken().catch(showError); }, wait);
  }

  /** Renews the access token with the apiKey (one renewal at a time). */
  function renewAccessToken() {
    if (!state.renewing) {
      const session = state.session;
      state.renewing = fetchAccessToken(state.apiKey)
        .then((grant) => {
          if (session === state.session) setAccess(grant);
        })
        .catch((err) => {
          if (session === state.session) {
            if (err.status === 401) {
              signOut(); // the apiKey is no longer accepted
            } else {
              clearTimeout(state.timers.renew);
              state.timers.renew = setTimeout(() => { renewAccessToken().catch(showError); }, 30000);
            }
          }
          throw err;
        })
        .finally(() => { state.renewing = null; });
    }
    return state.renewing;
  }

  /** Forgets everything about the signed-in user and stops every timer and stream. */
  function resetSession() {
    state.session += 1;
    stopQueueFollowing();
    for (const name of Object.keys(state.timers)) {
      clearTimeout(state.timers[name]);
      clearInterval(state.timers[name]);
      state.timers[name] = 0;
    }
    Object.assign(state, {
      apiKey: null, access: null, renewing: null, user: null, balance: null, history: null,
      queue: null, queueStatus: null, bookingShown: false, concerts: [], concert: null,
      schedules: [], schedule: null, seats: [], holding: false, hold: null,
    });
    state.seatSeq += 1;
    state.mine.clear();
    els.concertSelect.replaceChildren();
    els.scheduleSelect.replaceChildren();
    els.paymentResult.textContent = '';
    els.queueNote.textContent = '';
    hideApiKey();
    renderAll();
  }

  /** Starts a session from an access token (the user's id from its `sub` unless known). */
  async function beginSession(grant, known) {
    const id = known ? known.id : jwtSubject(grant.accessToken);
    if (id == null) throw new ApiError('The server sent an access token this page cannot read.');
    state.user = { id, name: known ? known.name : null };
    setAccess(grant);
    renderAll();
    await refreshPoints();
  }

  function signOut() {
    resetSession();
    notify('Signed out.');
  }

  function showApiKey(apiKey) {
    els.apiKey.textContent = String(apiKey);
    els.apiKeyBox.hidden = false;
    els.copyKeyButton.hidden = !(navigator.clipboard && navigator.clipboard.writeText);
  }

  function hideApiKey() {
    els.apiKey.textContent = '';
    els.apiKeyBox.hidden = true;
  }

  async function onSignUp(event) {
    event.preventDefault();
    await withBusy(els.signupButton, async () => {
      const name = els.signupName.value;
      if (!name.trim()) throw new ApiError('Enter a name to sign up.');
      const user = await api('/users', { method: 'POST', auth: 'none', body: { name } });
      resetSession();
      els.signupName.value = '';
      showApiKey(user.apiKey); // shown before anything else can fail
      els.apiKeyBox.focus();
      state.apiKey = user.apiKey;
      const grant = await fetchAccessToken(user.apiKey);
      await beginSession(grant, { id: user.id, name: user.name });
      notify(`Welcome, ${user.name}. Charge some points, then join the queue.`);
    });
  }

  async function onSignIn(event) {
    event.preventDefault();
    await withBusy(els.signinButton, async () => {
      const apiKey = els.signinKey.value.trim();
      if (!/^[\x21-\x7e]+$/.test(apiKey)) throw new ApiError('Enter the API key you were given at sign-up.');
      const grant = await fetchAccessToken(apiKey);
      resetSession();
      els.signinKey.value = ''; // the key stays in memory only, not in the page
      state.apiKey = apiKey;
      await beginSession(grant, null);
      notify('Signed in.');
    });
  }

  async function onCopyKey() {
    try {
      await navigator.clipboard.writeText(els.apiKey.textContent);
      notify('API key copied.');
    } catch {
      showError('Copying failed: select the key and copy it by hand.');
    }
  }

  // ---------------------------------------------------------------------------
  // Points

  async function loadBalance() {
    const answer = await api(`/users/${enc(state.user.id)}/points`);
    state.balance = answer.balance;
    renderPoints();
  }

  async function loadHistory() {
    const answer = await api(`/users/${enc(state.user.id)}/points/history?limit=${HISTORY_LIMIT}`);
    state.history = Array.isArray(answer) ? answer : [];
    renderPoints();
  }

  async function refreshPoints() {
    if (!state.user) return;
    await Promise.all([loadBalance(), loadHistory()]);
  }

  async function onCharge(event) {
    event.preventDefault();
    await withBusy(els.chargeButton, async () => {
      // Only "not a whole number" is caught here; the range is the server's to refuse,
      // and its detail is what the page shows.
      const amount = Number(els.chargeAmount.value);
      if (els.chargeAmount.value.trim() === '' || !Number.isSafeInteger(amount)) {
        throw new ApiError(`Enter a whole number of points, from 1 to ${MAX_CHARGE}.`);
      }
      // A key per charge: the retry after a token renewal is then charged once.
      const answer = await api(`/users/${enc(state.user.id)}/points/charge`, {
        method: 'POST', body: { amount }, headers: { 'Idempotency-Key': newIdempotencyKey() },
      });
      state.balance = answer.balance;
      els.chargeAmount.value = '';
      renderPoints();
      notify(`Charged ${amount} points.`);
      await loadHistory();
    });
  }

  // ---------------------------------------------------------------------------
  // Queue

  async function onJoinQueue() {
    await withBusy(els.queueButton, async () => {
      const view = await api('/queue/tokens', { method: 'POST', body: {} });
      stopQueueFollowing();
      clearTimeout(state.timers.active);
      state.queue = null;
      state.queueStatus = null;
      applyQueueView(view);
      if (state.queueStatus === 'WAITING') {
        els.queueNote.textContent = 'You are in line. Your place updates live.';
        notify('You joined the queue.');
        followQueue();
      }
    });
  }

  /** Takes a token view (from the POST, the stream or a poll) and acts on a change. */
  function applyQueueView(view) {
    if (!view || typeof view !== 'object') return;
    if (state.queue && !sameId(view.token, state.queue.token)) return; // another token's
    if (state.queueStatus === 'ENDED') return; // a late view of a token that ended
    const was = state.queueStatus;
    state.queue = view;
    state.queueStatus = view.status === 'ACTIVE' ? 'ACTIVE' : 'WAITING';
    renderQueue();
    renderControls();
    if (state.queueStatus === 'ACTIVE' && was !== 'ACTIVE') onActive();
  }

  /** The token turned ACTIVE: open the booking part and fill the selects. */
  function onActive() {
    stopQueueFollowing();
    const view = state.queue;
    const until = Date.parse(view.expiresAt);
    clearTimeout(state.timers.active);
    if (Number.isFinite(until)) {
      state.timers.active = setTimeout(() => {
        if (state.queue === view && state.queueStatus === 'ACTIVE') {
          queueEnded('Your booking time is over. Join the queue again to keep booking.');
        }
      }, Math.max(0, until - serverNow()) + 500);
      els.queueNote.textContent = `Your turn: book until ${formatClock(view.expiresAt)}.`;
    } else {
      els.queueNote.textContent = 'Your turn: choose a concert, a date and a seat.';
    }
    notify('Your turn: choose a concert, a date and a seat.');
    state.bookingShown = true;
    renderSession();
    renderSeats();
    loadConcerts().catch((err) => showError(err));
  }

  /** The token is over (paid, expired, or refused): stop following it and refreshing. */
  function queueEnded(message) {
    if (!state.queue || state.queueStatus === 'ENDED') return;
    stopQueueFollowing();
    clearTimeout(state.timers.active);
    stopSeatRefresh();
    state.queueStatus = 'ENDED';
    els.queueNote.textContent = message;
    renderQueue();
    renderSeats();
    renderControls();
  }

  function stopQueueFollowing() {
    state.queueGen += 1;
    if (state.streamAbort) {
      state.streamAbort.abort();
      state.streamAbort = null;
    }
  }

  /**
   * Follows a WAITING token until it is ACTIVE or over: the event stream first; when it
   * fails or ends while still WAITING, polls every 2 s and tries the stream again later.
   */
  async function followQueue() {
    stopQueueFollowing();
    const gen = state.queueGen;
    const alive = () => gen === state.queueGen && state.queueStatus === 'WAITING';
    let useStream = true;
    while (alive()) {
      if (useStream) {
        try {
          const outcome = await readQueueStream(gen);
          if (outcome === 'superseded') useStream = false; // a newer stream (another tab) follows it
        } catch {
          // Falls back to polling below (an error that ended the token stopped `alive`).
        }
        if (!alive()) return;
        els.queueNote.textContent = 'Live updates paused: checking your place every 2 seconds.';
      }
      const retryAt = Date.now() + STREAM_RETRY_MS;
      while (alive() && (!useStream || Date.now() < retryAt)) {
        await sleep(QUEUE_POLL_MS);
        if (!alive()) return;
        try {
          applyQueueView(await api('/queue/tokens/me', { queue: true }));
          clearBackgroundError();
        } catch (err) {
          if (alive()) showError(err, { background: true });
        }
      }
    }
  }

  /**
   * Reads the token's event stream with fetch (EventSource cannot send headers), parsing
   * the SSE lines itself. Resolves to why it ended: 'done' (ACTIVE or over), 'expired',
   * 'superseded', 'closed' (the server ended it); rejects when it failed.
   */
  async function readQueueStream(gen) {
    const controller = new AbortController();
    state.streamAbort = controller;
    let stallTimer = 0;
    const arm = () => {
      clearTimeout(stallTimer);
      stallTimer = setTimeout(() => controller.abort(), STREAM_STALL_MS);
    };
    arm();
    try {
      const res = await request('/queue/tokens/me/events', {
        queue: true, accept: 'text/event-stream', signal: controller.signal,
      });
      if (!res.body) throw new ApiError('This browser cannot read the live stream.');
      if (gen === state.queueGen) els.queueNote.textContent = 'You are in line. Your place updates live.';
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      let type = '';
      let data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return 'closed';
        arm();
        buffer += decoder.decode(value, { stream: true });
        // Split on CRLF, LF or CR; a CR at the very end may be half of a CRLF: keep it.
        const lines = buffer.split(/\r\n|\r(?!$)|\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line === '') { // a blank line ends an event
            const outcome = data.length ? dispatchQueueEvent(type || 'message', data.join('\n'), gen) : null;
            type = '';
            data = [];
            if (outcome) {
              reader.cancel().catch(() => {});
              return outcome;
            }
          } else if (!line.startsWith(':')) { // ':' starts a comment (heartbeats)
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            let fieldValue = colon < 0 ? '' : line.slice(colon + 1);
            if (fieldValue.startsWith(' ')) fieldValue = fieldValue.slice(1);
            if (field === 'event') type = fieldValue;
            else if (field === 'data') data.push(fieldValue);
          }
        }
      }
    } finally {
      clearTimeout(stallTimer);
      if (state.streamAbort === controller) state.streamAbort = null;
    }
  }

  /** Acts on one event of the stream; returns why the stream should end, or null. */
  function dispatchQueueEvent(type, data, gen) {
    if (gen !== state.queueGen) return 'stale';
    if (type === 'superseded') return 'superseded';
    if (type === 'expired') {
      queueEnded('Your place in the queue has expired. Join the queue again.');
      return 'expired';
    }
    let view;
    try {
      view = JSON.parse(data);
    } catch {
      return null; // not a view: ignored
    }
    applyQueueView(view);
    return state.queueStatus === 'WAITING' ? null : 'done';
  }

  // ---------------------------------------------------------------------------
  // Concerts, dates, seats

  /**
   * Fills a select with a placeholder and one option per item (value: the id as a
   * string; text set as text). Keeps the previous choice when it is still there, and
   * picks the only item when there is exactly one.
   */
  function fillSelect(select, items, label, placeholder) {
    const previous = select.value;
    const options = [new Option(placeholder, '')];
    for (const item of items) options.push(new Option(label(item), String(item.id)));
    select.replaceChildren(...options);
    if (previous && items.some((item) => String(item.id) === previous)) select.value = previous;
    else if (items.length === 1) select.value = String(items[0].id);
    else select.value = '';
  }

  async function loadConcerts() {
    const list = await api('/concerts');
    state.concerts = Array.isArray(list) ? list : [];
    fillSelect(els.concertSelect, state.concerts, (c) => `${c.title} — ${c.venue}`,
      state.concerts.length ? 'Choose a concert' : 'No concerts yet');
    await chooseConcert();
  }

  /** The concert select changed (or was filled): load its dates. */
  async function chooseConcert() {
    const concert = state.concerts.find((c) => String(c.id) === els.concertSelect.value) || null;
    if (!concert || !sameId(concert.id, state.concert && state.concert.id)) {
      state.schedules = [];
      fillSelect(els.scheduleSelect, [], scheduleLabel, concert ? 'Loading dates…' : 'Choose a concert first');
    }
    state.concert = concert;
    if (!concert) {
      chooseSchedule();
      return;
    }
    const list = await api(`/concerts/${enc(concert.id)}/schedules`, { queue: true });
    if (state.concert !== concert) return; // another concert was chosen meanwhile
    state.schedules = Array.isArray(list) ? list : [];
    fillSelect(els.scheduleSelect, state.schedules, scheduleLabel,
      state.schedules.length ? 'Choose a date' : 'No dates open for booking');
    chooseSchedule();
  }

  /** The date select changed (or was filled): show its seat map and keep it current. */
  function chooseSchedule() {
    const schedule = state.schedules.find((s) => String(s.id) === els.scheduleSelect.value) || null;
    if (!schedule || !sameId(schedule.id, state.schedule && state.schedule.id)) {
      state.seats = [];
      state.seatSeq += 1;
    }
    state.schedule = schedule;
    renderSeats();
    startSeatRefresh();
  }

  /** Loads the seat map of the shown date (answers to older requests are dropped). */
  async function refreshSeats() {
    const schedule = state.schedule;
    if (!schedule || state.queueStatus !== 'ACTIVE') return;
    const seq = ++state.seatSeq;
    try {
      const answer = await api(`/schedules/${enc(schedule.id)}/seats`, { queue: true });
      if (seq !== state.seatSeq || schedule !== state.schedule) return;
      state.seats = answer && Array.isArray(answer.seats) ? answer.seats : [];
      renderSeats();
      updateScheduleOption(schedule);
      clearBackgroundError();
    } catch (err) {
      if (seq === state.seatSeq) showError(err, { background: true });
    }
  }

  /** Keeps the date's "N of 50 seats free" current with the seat map. */
  function updateScheduleOption(schedule) {
    schedule.availableSeats = state.seats.filter((seat) => seat.status === 'AVAILABLE').length;
    const option = Array.from(els.scheduleSelect.options).find((o) => o.value === String(schedule.id));
    if (option) option.textContent = scheduleLabel(schedule);
  }

  const seatRefreshWanted = () => Boolean(state.schedule) && state.queueStatus === 'ACTIVE' && !document.hidden;

  /** Refreshes the seat map every 2 s while a date is shown, the token ACTIVE and the tab visible. */
  function scheduleSeatRefresh() {
    clearTimeout(state.timers.seats);
    if (!seatRefreshWanted()) return;
    state.timers.seats = setTimeout(async () => {
      await refreshSeats();
      scheduleSeatRefresh();
    }, SEAT_REFRESH_MS);
  }

  function startSeatRefresh() {
    clearTimeout(state.timers.seats);
    if (!seatRefreshWanted()) return;
    refreshSeats().finally(scheduleSeatRefresh);
  }

  function stopSeatRefresh() {
    clearTimeout(state.timers.seats);
    state.timers.seats = 0;
  }

  function onVisibilityChange() {
    if (document.hidden) stopSeatRefresh();
    else startSeatRefresh();
  }

  /**
   * Draws a change this page just made (and the server confirmed) without waiting for the
   * next refresh; answers to refreshes already in flight are dropped.
   */
  function setLocalSeatStatus(scheduleId, seatNumber, status) {
    if (!state.schedule || !sameId(state.schedule.id, scheduleId)) return;
    const seat = state.seats.find((s) => sameId(s.seatNumber, seatNumber));
    if (!seat) return;
    seat.status = status;
    state.seatSeq += 1;
  }

  /** Moves focus to a seat's button (after the hold section it was in disappears). */
  function focusSeat(seatNumber) {
    const button = els.seatMap.querySelector(`button.seat[data-seat="${CSS.escape(String(seatNumber))}"]`);
    if (button && !button.disabled) button.focus();
  }

  // ---------------------------------------------------------------------------
  // Hold, cancel, pay

  function onSeatClick(event) {
    const button = event.target.closest('button.seat');
    if (!button || button.disabled || !els.seatMap.contains(button)) return;
    const seat = state.seats.find((s) => String(s.seatNumber) === button.dataset.seat);
    if (seat) holdSeat(seat);
  }

  async function holdSeat(seat) {
    if (state.holding) return;
    clearError();
    if (state.hold) {
      showError(`You are holding seat ${state.hold.reservation.seatNumber}: pay for it or cancel it first.`);
      return;
    }
    const schedule = state.schedule;
    state.holding = true;
    try {
      const reservation = await api('/reservations', {
        method: 'POST', queue: true, body: { scheduleId: schedule.id, seatNumber: seat.seatNumber },
      });
      // One idempotency key per reservation, reused by every click on Pay.
      state.hold = { reservation, idempotencyKey: newIdempotencyKey(), heldUntil: Date.parse(reservation.heldUntil) };
      state.mine.add(mineKey(reservation.scheduleId ?? schedule.id, reservation.seatNumber));
      setLocalSeatStatus(schedule.id, reservation.seatNumber, 'HELD');
      els.paymentResult.textContent = '';
      renderSeats();
      startCountdown();
      renderControls();
      notify(`Seat ${reservation.seatNumber} is held for you. Pay before the time runs out.`);
      els.payButton.focus();
    } catch (err) {
      showError(err);
    } finally {
      state.holding = false;
      startSeatRefresh();
    }
  }

  function startCountdown() {
    clearInterval(state.timers.countdown);
    tickCountdown();
    state.timers.countdown = setInterval(tickCountdown, 250);
  }

  /** Updates the countdown; a hold that ran out is dropped (unless a payment is in flight). */
  function tickCountdown() {
    const hold = state.hold;
    if (!hold) {
      clearInterval(state.timers.countdown);
      return;
    }
    renderHold();
    if (Number.isFinite(hold.heldUntil) && hold.heldUntil <= serverNow() && !state.busy.has(els.payButton)) {
      dropHold(hold);
      showError(`Your hold on seat ${hold.reservation.seatNumber} ran out; the seat is free again.`);
      startSeatRefresh();
    }
  }

  /** Forgets a hold (cancelled, expired, or refused by the server). */
  function dropHold(hold) {
    if (state.hold !== hold) return;
    state.hold = null;
    clearInterval(state.timers.countdown);
    state.mine.delete(mineKey(hold.reservation.scheduleId ?? (state.schedule && state.schedule.id),
      hold.reservation.seatNumber));
    renderHold();
    renderSeats();
    renderControls();
  }

  async function onCancel() {
    const hold = state.hold;
    if (!hold) return;
    await withBusy(els.cancelButton, async () => {
      try {
        await api(`/reservations/${enc(hold.reservation.id)}`, { method: 'DELETE', queue: true });
      } catch (err) {
        if (err.code === 'RESERVATION_NOT_HELD' || err.code === 'RESERVATION_NOT_FOUND') {
          dropHold(hold);
          startSeatRefresh();
        }
        throw err;
      }
      setLocalSeatStatus(hold.reservation.scheduleId ?? (state.schedule && state.schedule.id),
        hold.reservation.seatNumber, 'AVAILABLE');
      dropHold(hold);
      notify(`Seat ${hold.reservation.seatNumber} released.`);
      await refreshSeats();
      focusSeat(hold.reservation.seatNumber);
    });
  }

  async function onPay() {
    const hold = state.hold;
    if (!hold) return;
    await withBusy(els.payButton, async () => {
      let payment;
      try {
        payment = await api('/payments', {
          method: 'POST',
          queue: true,
          body: { reservationId: hold.reservation.id },
          headers: { 'Idempotency-Key': hold.idempotencyKey },
        });
      } catch (err) {
        if (['RESERVATION_EXPIRED', 'ALREADY_PAID', 'RESERVATION_NOT_FOUND'].includes(err.code)) {
          dropHold(hold);
          startSeatRefresh();
        }
        throw err; // other failures keep the hold and its key: Pay again is safe
      }
      await paid(hold, payment);
    });
  }

  /** A completed payment: draw the seat sold, end the queue token, refresh the points. */
  async function paid(hold, payment) {
    const { reservation } = hold;
    state.mine.add(mineKey(reservation.scheduleId ?? (state.schedule && state.schedule.id), reservation.seatNumber));
    state.hold = null;
    clearInterval(state.timers.countdown);
    // The payment spent the queue token, so the map cannot be fetched again: draw the
    // sold seat here, and drop any refresh still in flight.
    state.seatSeq += 1;
    setLocalSeatStatus(reservation.scheduleId ?? (state.schedule && state.schedule.id),
      reservation.seatNumber, 'SOLD');
    els.paymentResult.textContent =
      `Paid ${payment.amount} points for seat ${reservation.seatNumber} (payment ${payment.id}).`;
    queueEnded('Booking done: the payment ended your queue token. Queue again to book another seat.');
    renderHold();
    renderSeats();
    renderControls();
    notify(`Seat ${reservation.seatNumber} is yours.`);
    els.paymentResult.focus(); // the Pay button it came from is gone
    await refreshPoints();
  }

  // ---------------------------------------------------------------------------
  // Wiring

  function init() {
    const ids = {
      error: 'error', notice: 'notice', sessionLine: 'session-line', who: 'who',
      signoutButton: 'signout-button', signupForm: 'signup-form', signupName: 'signup-name',
      signupButton: 'signup-button', signinForm: 'signin-form', signinKey: 'signin-key',
      signinButton: 'signin-button', apiKeyBox: 'api-key-box', apiKey: 'api-key',
      copyKeyButton: 'copy-key-button', dismissKeyButton: 'dismiss-key-button',
      pointsSection: 'points', balance: 'balance', chargeForm: 'charge-form',
      chargeAmount: 'charge-amount', chargeButton: 'charge-button', history: 'history',
      historyEmpty: 'history-empty', queueSection: 'queue', queueButton: 'queue-button',
      queueStatus: 'queue-status', queuePosition: 'queue-position', queueWait: 'queue-wait',
      queueNote: 'queue-note', bookingSection: 'booking', concertSelect: 'concert-select',
      scheduleSelect: 'schedule-select', seatMap: 'seat-map', holdSection: 'hold',
      holdSeat: 'hold-seat', holdPrice: 'hold-price', holdCountdown: 'hold-countdown',
      payButton: 'pay-button', cancelButton: 'cancel-button', paymentResult: 'payment-result',
    };
    for (const [key, id] of Object.entries(ids)) els[key] = document.getElementById(id);

    els.signupForm.addEventListener('submit', onSignUp);
    els.signinForm.addEventListener('submit', onSignIn);
    els.chargeForm.addEventListener('submit', onCharge);
    els.signoutButton.addEventListener('click', () => { clearError(); signOut(); });
    els.copyKeyButton.addEventListener('click', onCopyKey);
    els.dismissKeyButton.addEventListener('click', () => {
      hideApiKey();
      els.chargeAmount.focus();
    });
    els.queueButton.addEventListener('click', onJoinQueue);
    els.concertSelect.addEventListener('change', () => {
      clearError();
      chooseConcert().catch((err) => showError(err));
    });
    els.scheduleSelect.addEventListener('change', () => {
      clearError();
      chooseSchedule();
    });
    els.seatMap.addEventListener('click', onSeatClick);
    els.payButton.addEventListener('click', onPay);
    els.cancelButton.addEventListener('click', onCancel);
    document.addEventListener('visibilitychange', onVisibilityChange);

    renderAll();
    document.body.dataset.ready = 'true';
  }

  init();
})();
