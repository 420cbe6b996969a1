// The dashboard: latest prices, a chart of one ticker (line or candles) with its missing
// slots, kept live by /prices/stream. Plain script, no build step; everything it shows comes
// from the public API. `window.dashboard` holds what is drawn (the browser test reads it, and
// its `seriesData` and `x` ask the chart itself what it holds and where it puts a time).
"use strict";

(() => {
  const LWC = window.LightweightCharts;
  // Candle interval per span: a few hundred bars at most, whatever the span.
  const CANDLES_FOR_SPAN = { 3600: "1m", 86400: "15m", 604800: "1h", 2592000: "4h", all: "1d" };
  const INTERVAL_SECONDS = { "1m": 60, "15m": 900, "1h": 3600, "4h": 14400, "1d": 86400 };
  // Spans up to a day draw every stored row as a line; longer ones draw candle closes.
  const RAW_LINE_MAX_SPAN = 86400;
  const MAX_GAP_ITEMS = 50;
  const MAX_BACKFILL_MARKERS = 500;
  // Every missing slot is a whitespace point: the line breaks there and the gap is as wide as
  // the slots it lacks. Beyond this many, a point stands for several slots (memory stays bounded).
  const MAX_WHITESPACE_POINTS = 20000;
  const GAP_COLOR = "transparent";

  const state = {
    tickers: [],
    latest: {},
    ticker: null,
    span: "86400",
    mode: "line",
    points: [],
    gaps: [],
    interval: null,
    ready: false,
    draws: 0,
  };
  window.dashboard = state;

  const $ = (id) => document.getElementById(id);
  const color = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const now = () => Math.floor(Date.now() / 1000);
  const clock = (ts) => new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";

  function nextLink(response, url) {
    const match = /<([^>]+)>;\s*rel="next"/.exec(response.headers.get("link") || "");
    return match ? new URL(match[1], new URL(url, location.href)).toString() : null;
  }

  // When the API requires keys (API_KEYS_REQUIRED), ask once and keep the key in this
  // browser; ask again only when the API refuses the kept one (revoked).
  const KEY_STORAGE = "crypto-client.api-key";
  const storedKey = () => localStorage.getItem(KEY_STORAGE);
  const keyHeaders = (key) => (key ? { Authorization: `Bearer ${key}` } : {});

  async function authorizedFetch(url, options = {}) {
    for (;;) {
      const sent = storedKey();
      const headers = { ...(options.headers || {}), ...keyHeaders(sent) };
      const response = await fetch(url, { ...options, headers });
      if (response.status !== 401) return response;
      if (storedKey() !== sent) continue; // another request was given a key meanwhile
      const key = window.prompt("This API needs an API key (crypto-client keys create NAME):");
      if (!key || !key.trim()) return response;
      localStorage.setItem(KEY_STORAGE, key.trim());
    }
  }

  async function getJson(url) {
    const response = await authorizedFetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      throw new Error(`${url}: HTTP ${response.status}`);
    }
    return { body: await response.json(), next: nextLink(response, url) };
  }

  async function getPages(url, maxPages = 20) {
    let rows = [];
    for (let next = url, page = 0; next && page < maxPages; page += 1) {
      const answer = await getJson(next);
      rows = rows.concat(answer.body);
      next = answer.next;
    }
    return rows;
  }

  // --- latest prices -----------------------------------------------------------------------

  function age(ts) {
    if (ts === null || ts === undefined) return "no data";
    const seconds = Math.max(0, now() - ts);
    if (seconds < 120) return `${seconds} s`;
    if (seconds < 7200) return `${Math.floor(seconds / 60)} min`;
    if (seconds < 172800) return `${Math.floor(seconds / 3600)} h`;
    return `${Math.floor(seconds / 86400)} d`;
  }

  function renderTickers() {
    const body = $("tickers");
    body.replaceChildren(
      ...state.tickers.map((ticker) => {
        const latest = state.latest[ticker] || {};
        const row = document.createElement("tr");
        row.dataset.ticker = ticker;
        row.setAttribute("aria-current", String(ticker === state.ticker));
        const name = document.createElement("td");
        const select = document.createElement("button");
        select.type = "button";
        select.textContent = ticker;
        select.setAttribute("aria-label", `Show ${ticker} on the chart`);
        select.addEventListener("click", () => selectTicker(ticker));
        name.append(select);
        const price = document.createElement("td");
        price.className = "price";
        price.textContent = latest.price ?? "—";
        const ageCell = document.createElement("td");
        ageCell.className = "age";
        ageCell.textContent = age(latest.ts);
        row.append(name, price, ageCell);
        return row;
      }),
    );
  }

  function refreshAges() {
    for (const row of $("tickers").children) {
      row.querySelector(".age").textContent = age((state.latest[row.dataset.ticker] || {}).ts);
    }
  }

  // --- the chart ---------------------------------------------------------------------------

  const chart = LWC.createChart($("chart"), {
    autoSize: true,
    layout: { background: { color: color("--bg") }, textColor: color("--fg") },
    grid: { vertLines: { color: color("--line") }, horzLines: { color: color("--line") } },
    timeScale: { timeVisible: true, secondsVisible: true, tickMarkFormatter: tickLabel, borderColor: color("--line") },
    rightPriceScale: { borderColor: color("--line") },
  });
  let series = null;
  let markers = null;
  state.seriesData = () => (series ? series.data() : []);
  state.x = (time) => chart.timeScale().timeToCoordinate(time);
  state.show = (from, to) => chart.timeScale().setVisibleRange({ from, to });
  state.fit = () => chart.timeScale().fitContent();

  function tickLabel(time, type) {
    // Times of day in UTC: seconds only on ticks between whole minutes, so a short span reads
    // 12:00:30, 12:01, 12:01:30 rather than the same minute twice. Dates: the library's own.
    if (type !== LWC.TickMarkType.Time && type !== LWC.TickMarkType.TimeWithSeconds) return null;
    const text = new Date(time * 1000).toISOString().slice(11, 19);
    return text.endsWith(":00") ? text.slice(0, 5) : text;
  }

  function candleInterval() {
    return CANDLES_FOR_SPAN[state.span];
  }

  function rawLine() {
    return state.mode === "line" && state.span !== "all" && Number(state.span) <= RAW_LINE_MAX_SPAN;
  }

  function bucketSeconds() {
    return rawLine() ? null : INTERVAL_SECONDS[candleInterval()];
  }

  function bucketOf(ts) {
    return rawLine() ? ts : ts - (ts % bucketSeconds());
  }

  // Rows not polled live: from Deribit's chart history or from the first trade in the slot.
  function isBackfilled(source) {
    return source === "backfill" || source === "trade";
  }

  function linePoint(ts, price, backfilled) {
    return backfilled ? { time: ts, value: price, color: color("--backfilled") } : { time: ts, value: price };
  }

  function bar(candle) {
    // Wholly back-filled: drawn in the back-fill colour; partly: outlined in it.
    const shown = { time: candle.ts, open: candle.open, high: candle.high, low: candle.low, close: candle.close };
    const mark = color("--backfilled");
    if (candle.backfilled > 0 && candle.backfilled === candle.count) {
      Object.assign(shown, { color: mark, wickColor: mark, borderColor: mark });
    } else if (candle.backfilled > 0) {
      shown.borderColor = mark;
    }
    return shown;
  }

  async function loadPoints(ticker, from) {
    const bounds = from === null ? "" : `&from_ts=${from}`;
    const name = encodeURIComponent(ticker);
    if (rawLine()) {
      const rows = await getPages(`/prices/range?ticker=${name}${bounds}&limit=10000`);
      return rows.map((row) => linePoint(row.ts, row.price, isBackfilled(row.source)));
    }
    const candles = await getPages(`/prices/candles?ticker=${name}&interval=${candleInterval()}${bounds}&limit=10000`);
    if (state.mode === "line") {
      return candles.map((candle) => linePoint(candle.ts, candle.close, candle.backfilled > 0));
    }
    return candles.map(bar);
  }

  async function loadGaps(ticker, from) {
    const bounds = from === null ? "" : `&from_ts=${Math.max(0, from)}`;
    const { body } = await getJson(`/coverage?ticker=${encodeURIComponent(ticker)}${bounds}&limit=1000`);
    return body;
  }

  function withGaps(points, gaps, interval) {
    // A point without a value (whitespace) for each missing slot, or each bucket without a
    // row: the line breaks there, and the time axis, which gives every point the same width,
    // keeps the gap as wide as the time it lacks. A marker names the gap.
    const times = new Set(points.map((point) => point.time));
    const breaks = [];
    const gapMarkers = [];
    const missing = gaps.reduce((sum, gap) => sum + gap.slots, 0);
    const stride = Math.max(1, Math.ceil(missing / MAX_WHITESPACE_POINTS));
    const step = Math.max(interval * stride, bucketSeconds() ?? 0);
    for (const gap of gaps) {
      for (let slot = gap.from_ts; slot <= gap.to_ts; slot += step) {
        const time = bucketOf(slot);
        if (!times.has(time)) {
          times.add(time);
          breaks.push({ time });
        }
      }
      const time = bucketOf(gap.from_ts);
      gapMarkers.push({
        time,
        position: "aboveBar",
        shape: "arrowDown",
        color: color("--gap"),
        text: `${gap.slots} missing`,
      });
    }
    // On a line, a back-filled point also gets a dot: its coloured segment may be a pixel wide.
    const backfillMarkers =
      state.mode === "line"
        ? points
            .filter((point) => point.color !== undefined)
            .slice(-MAX_BACKFILL_MARKERS)
            .map((point) => ({ time: point.time, position: "inBar", shape: "circle", size: 0.6, color: point.color }))
        : [];
    const all = points.concat(breaks).sort((a, b) => a.time - b.time);
    // A line joins the points on either side of whitespace, in the colour of the one before:
    // transparent, so that nothing is drawn across missing slots.
    if (state.mode === "line") {
      for (let i = 0; i + 1 < all.length; i += 1) {
        if (all[i].value !== undefined && all[i + 1].value === undefined) {
          all[i] = { ...all[i], color: GAP_COLOR };
        }
      }
    }
    const allMarkers = gapMarkers.concat(backfillMarkers).sort((a, b) => a.time - b.time);
    return { all, gapMarkers: allMarkers };
  }

  function renderGaps() {
    const list = $("gaps");
    const shown = state.gaps.slice(0, MAX_GAP_ITEMS).map((gap) => {
      const item = document.createElement("li");
      const slots = gap.slots === 1 ? "1 slot" : `${gap.slots} slots`;
      item.textContent = `${clock(gap.from_ts)} to ${clock(gap.to_ts)}: ${slots} missing (${gap.reason.replaceAll("_", " ")})`;
      return item;
    });
    if (state.gaps.length > MAX_GAP_ITEMS) {
      const more = document.createElement("li");
      more.textContent = `and ${state.gaps.length - MAX_GAP_ITEMS} more (see /coverage)`;
      shown.push(more);
    }
    if (shown.length === 0) {
      const none = document.createElement("li");
      none.textContent = "none";
      shown.push(none);
    }
    list.replaceChildren(...shown);
  }

  // Why a span has no price at all, from the ledger: an empty chart says nothing.
  function emptyReason(ticker, gaps) {
    if (gaps.length === 0) return `No price of ${ticker} is stored in this span, and no tick has run for it yet.`;
    const latest = gaps.reduce((a, b) => (b.to_ts > a.to_ts ? b : a));
    const why = latest.reason.replaceAll("_", " ") + (latest.detail ? `: ${latest.detail}` : "");
    const offline = /connection failed/.test(latest.detail || "")
      ? " Deribit cannot be reached from here; without internet, `crypto-client serve --simulate` is the offline demo."
      : "";
    return `No price of ${ticker} is stored in this span. The latest slots are missing because ${why}.${offline}`;
  }

  function newSeries() {
    if (series) chart.removeSeries(series);
    series =
      state.mode === "line"
        ? chart.addSeries(LWC.LineSeries, { color: color("--observed"), lineWidth: 2, priceLineVisible: false })
        : chart.addSeries(LWC.CandlestickSeries, {
            upColor: color("--up"),
            downColor: color("--down"),
            wickUpColor: color("--up"),
            wickDownColor: color("--down"),
            borderUpColor: color("--up"),
            borderDownColor: color("--down"),
          });
    markers = LWC.createSeriesMarkers(series, []);
  }

  let drawing = 0;
  async function draw() {
    const ticker = state.ticker;
    if (ticker === null) return;
    const mine = ++drawing;
    const from = state.span === "all" ? null : now() - Number(state.span);
    setStatus(`Loading ${ticker}…`);
    try {
      const [points, coverage] = await Promise.all([loadPoints(ticker, from), loadGaps(ticker, from)]);
      if (mine !== drawing) return; // a newer choice was made meanwhile
      const gaps = coverage.gaps;
      const { all, gapMarkers } = withGaps(points, gaps, coverage.interval_seconds);
      newSeries();
      series.setData(all);
      markers.setMarkers(gapMarkers);
      chart.timeScale().fitContent();
      state.points = all;
      state.gaps = gaps;
      state.interval = coverage.interval_seconds;
      renderGaps();
      const empty = $("empty");
      empty.hidden = points.length > 0;
      empty.textContent = points.length > 0 ? "" : emptyReason(ticker, gaps);
      $("chart-title").textContent = ticker;
      $("chart").setAttribute("aria-label", `${ticker}: ${points.length} points, ${gaps.length} gaps`);
      state.ready = true;
      state.draws += 1;
      setStatus(`${ticker}: ${points.length} points, live`);
    } catch (error) {
      setStatus(`Could not load ${ticker}: ${error.message}`);
    }
  }

  function applyLive(row) {
    if (!series || row.ticker !== state.ticker) return;
    const time = bucketOf(row.ts);
    const last = state.points[state.points.length - 1];
    if (last && time < last.time) return; // an older row (back-fill): shown on the next load
    const backfilled = isBackfilled(row.source);
    let point;
    if (state.mode === "line") {
      point = linePoint(time, row.price, backfilled);
    } else if (last && last.time === time && last.open !== undefined) {
      point = { ...last, high: Math.max(last.high, row.price), low: Math.min(last.low, row.price), close: row.price };
    } else {
      const fresh = { ts: time, open: row.price, high: row.price, low: row.price, close: row.price };
      point = bar({ ...fresh, count: 1, backfilled: backfilled ? 1 : 0 });
    }
    series.update(point);
    if (last && last.time === time) state.points[state.points.length - 1] = point;
    else state.points.push(point);
  }

  // --- controls and live updates -------------------------------------------------------------

  function setStatus(text) {
    $("status").textContent = text;
  }

  function press(groupId, attribute, value) {
    for (const button of $(groupId).querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset[attribute] === value));
    }
  }

  function selectTicker(ticker) {
    state.ticker = ticker;
    renderTickers();
    draw();
  }

  for (const button of $("spans").querySelectorAll("button")) {
    button.addEventListener("click", () => {
      state.span = button.dataset.span;
      press("spans", "span", state.span);
      draw();
    });
  }
  for (const button of $("modes").querySelectorAll("button")) {
    button.addEventListener("click", () => {
      state.mode = button.dataset.mode;
      press("modes", "mode", state.mode);
      draw();
    });
  }

  // EventSource cannot send a key: with one, the stream is read with fetch, resuming from
  // the last event's id after a break as EventSource would.
  async function followWithKey(on) {
    let lastId = null;
    for (;;) {
      try {
        const headers = { Accept: "text/event-stream", ...(lastId ? { "Last-Event-ID": lastId } : {}) };
        const response = await authorizedFetch("/prices/stream", { headers });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          // Lines end in CRLF, LF or CR; a CR at a chunk's end waits for the next chunk.
          buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const event = { type: "message", data: [] };
            for (const line of buffer.slice(0, end).split("\n")) {
              const [field, ...rest] = line.split(":");
              const text = rest.join(":").replace(/^ /, "");
              if (field === "event") event.type = text;
              else if (field === "data") event.data.push(text);
              else if (field === "id") lastId = text;
            }
            buffer = buffer.slice(end + 2);
            if (on[event.type]) on[event.type]({ data: event.data.join("\n") });
          }
        }
      } catch (error) {
        setStatus(`Live stream interrupted (${error.message}); reconnecting.`);
      }
      await new Promise((resolve) => setTimeout(resolve, 3000));
    }
  }

  function follow() {
    const on = {
      price: onPrice,
      // The API restarted this stream at its newest row (its database was restored or
      // replaced): what is drawn may no longer be what is stored.
      reset: () => draw(),
    };
    if (storedKey()) {
      followWithKey(on);
      return;
    }
    // Every configured ticker; EventSource reconnects by itself, resuming with Last-Event-ID.
    const stream = new EventSource("/prices/stream");
    stream.addEventListener("price", on.price);
    stream.addEventListener("reset", on.reset);
  }

  function onPrice(event) {
    const row = JSON.parse(event.data);
    const known = state.latest[row.ticker];
    if (!known || known.ts === null || row.ts >= known.ts) {
      state.latest[row.ticker] = row;
      renderTickers();
    }
    applyLive(row);
  }

  // Light or dark follows the system, also when it changes while the page is open.
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    chart.applyOptions({
      layout: { background: { color: color("--bg") }, textColor: color("--fg") },
      grid: { vertLines: { color: color("--line") }, horzLines: { color: color("--line") } },
      timeScale: { borderColor: color("--line") },
      rightPriceScale: { borderColor: color("--line") },
    });
    draw();
  });

  async function start() {
    press("spans", "span", state.span);
    press("modes", "mode", state.mode);
    try {
      const snapshot = (await getJson("/prices/snapshot")).body;
      state.tickers = snapshot.map((row) => row.ticker);
      for (const row of snapshot) state.latest[row.ticker] = row;
    } catch (error) {
      setStatus(`Could not load the latest prices: ${error.message}`);
      return;
    }
    state.ticker = state.tickers[0] ?? null;
    renderTickers();
    if (state.ticker === null) {
      setStatus("No tickers configured.");
      return;
    }
    follow();
    setInterval(refreshAges, 1000);
    await draw();
  }

  start();
})();
