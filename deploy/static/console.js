// The console's only script: refresh the live parts of the page while a job runs, and draw the charts (uPlot).
// The server says how often to refresh in <body data-refresh="seconds"> (empty: stop) and marks the parts that
// change with data-live (each has an id); a refresh fetches the same page and swaps those parts in, so a form
// being filled in is left alone.
"use strict";

const COLORS = ["#2f6feb", "#1f883d", "#cf222e", "#9a6700", "#8250df", "#bf3989", "#0a7480", "#57606a", "#953800"];

function chartData(throughput, kind) {
  const t = throughput.t;
  if (kind === "queue") {
    return {
      series: [
        { label: "rows waiting", values: throughput.queue_rows },
        { label: "jobs running", values: throughput.jobs_running },
        { label: "jobs queued", values: throughput.jobs_queued },
      ],
      t,
    };
  }
  const rates = throughput[kind];
  const series = [{ label: "total", values: rates.total }];
  for (const [actor, values] of Object.entries(rates.actors)) {
    series.push({ label: actor.length > 12 ? actor.slice(0, 8) : actor, values });
  }
  return { series, t };
}

function drawCharts() {
  const source = document.getElementById("throughput-data");
  if (!source || typeof uPlot === "undefined") return;
  const throughput = JSON.parse(source.textContent);
  for (const el of document.querySelectorAll("[data-chart]")) {
    const { series, t } = chartData(throughput, el.dataset.chart);
    el.replaceChildren();
    if (t.length < 2) {
      const empty = document.createElement("div");
      empty.className = "empty";
      empty.textContent = "collecting: a point every " + throughput.interval_s + " s";
      el.appendChild(empty);
      continue;
    }
    const options = {
      width: Math.max(300, el.clientWidth),
      height: 200,
      series: [{}].concat(series.map((s, i) => ({
        label: s.label, stroke: COLORS[i % COLORS.length], width: i === 0 ? 2 : 1, points: { show: false },
      }))),
      axes: [{}, { size: 50 }],
      legend: { live: false },
    };
    new uPlot(options, [t].concat(series.map((s) => s.values)), el);
  }
}

function scheduleRefresh() {
  const seconds = Number(document.body.dataset.refresh || 0);
  if (!seconds) return;
  setTimeout(async () => {
    try {
      const response = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (response.ok && !response.redirected) {
        const next = new DOMParser().parseFromString(await response.text(), "text/html");
        for (const el of document.querySelectorAll("[data-live]")) {
          const fresh = next.getElementById(el.id);
          if (fresh) el.replaceWith(document.importNode(fresh, true));
        }
        document.body.dataset.refresh = next.body.dataset.refresh || "";
        const footer = next.querySelector("footer");
        if (footer) document.querySelector("footer").replaceWith(document.importNode(footer, true));
        drawCharts();
      } else if (response.redirected) {
        location.reload(); // the session ended: the login page
        return;
      }
    } catch (err) {
      // The service is restarting or the network blinked: try again at the next tick.
    }
    scheduleRefresh();
  }, seconds * 1000);
}

function checkUploadSize() {
  for (const input of document.querySelectorAll("input[type=file][data-max-bytes]")) {
    input.addEventListener("change", () => {
      const limit = Number(input.dataset.maxBytes);
      const file = input.files[0];
      input.setCustomValidity(file && file.size > limit ? `over ${limit} bytes: give its URI instead` : "");
      input.reportValidity();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  drawCharts();
  checkUploadSize();
  scheduleRefresh();
  let resized;
  window.addEventListener("resize", () => { clearTimeout(resized); resized = setTimeout(drawCharts, 200); });
});
