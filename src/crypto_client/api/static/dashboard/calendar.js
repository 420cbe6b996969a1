// The calendar strip under the chart: one cell per UTC day of the selected ticker's last
// CALENDAR_DAYS days, coloured by completeness (stored over expected slots, from /quality).
// It follows the ticker the chart shows. `window.dashboard.calendar` holds what is drawn.
"use strict";

(() => {
  const CALENDAR_DAYS = 30;
  const DAY = 86400;
  const calendar = { ticker: null, days: [], ready: false, error: null };
  window.dashboard.calendar = calendar;
  const strip = document.getElementById("calendar");
  const title = document.getElementById("chart-title");

  // The class a day's cell gets, from its completeness (null: no slot was expected).
  function grade(completeness) {
    if (completeness === null) return "none";
    if (completeness >= 1) return "complete";
    if (completeness >= 0.99) return "high";
    if (completeness >= 0.9) return "medium";
    if (completeness > 0) return "low";
    return "empty";
  }

  function describe(day) {
    if (day.completeness === null) return `${day.day}: no slots expected`;
    const percent = (day.completeness * 100).toFixed(2);
    return `${day.day}: ${percent} % complete (${day.expected_slots - day.missing_slots} of ${day.expected_slots} slots)`;
  }

  function render() {
    strip.replaceChildren(
      ...calendar.days.map((day) => {
        const cell = document.createElement("li");
        cell.className = `day ${grade(day.completeness)}`;
        cell.dataset.day = day.day;
        cell.dataset.completeness = day.completeness === null ? "" : String(day.completeness);
        cell.title = describe(day);
        cell.setAttribute("aria-label", describe(day));
        return cell;
      }),
    );
  }

  let loading = 0;
  async function load(ticker) {
    const mine = ++loading;
    const today = Math.floor(Date.now() / 1000 / DAY) * DAY;
    const params = new URLSearchParams({ ticker, from_ts: String(today - (CALENDAR_DAYS - 1) * DAY) });
    try {
      const response = await fetch(`/quality?${params}`, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`/quality: HTTP ${response.status}`);
      const body = await response.json();
      if (mine !== loading) return; // another ticker was chosen meanwhile
      calendar.ticker = ticker;
      calendar.days = body.days;
      calendar.error = null;
      render();
      calendar.ready = true;
    } catch (error) {
      calendar.error = error.message;
    }
  }

  // The chart's title names the ticker once it is drawn.
  new MutationObserver(() => {
    const ticker = title.textContent;
    if (ticker && ticker !== "—" && ticker !== calendar.ticker) load(ticker);
  }).observe(title, { childList: true, characterData: true, subtree: true });
})();
