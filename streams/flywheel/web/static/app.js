// Flywheel's UI: opens the page's Server-Sent Events stream and draws what arrives. No polling: the
// server pushes a page's data when it changes. Data is only ever put in the page with textContent (never
// innerHTML): event names and properties come from anyone holding a write key (docs/design.md §12).
"use strict";

(function () {
  const page = document.body.dataset.page;
  if (!page) return;

  const $ = (id) => document.getElementById(id);
  const charts = {};

  function el(tag, text, attrs) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (attrs) for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  }

  function row(cells, attrs) {
    const tr = el("tr", null, attrs);
    for (const c of cells) tr.appendChild(el("td", c));
    return tr;
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // Tooltips are drawn by the chart (renderMode richText), not as HTML: no markup built from data, and no
  // inline styles for the Content-Security-Policy to refuse.
  function chart(id) {
    const node = $(id);
    if (!node) return null;
    if (!charts[id]) {
      charts[id] = echarts.init(node, null, { renderer: "svg" });
      const setOption = charts[id].setOption.bind(charts[id]);
      charts[id].setOption = (option, notMerge) => {
        if (option.tooltip) option.tooltip.renderMode = "richText";
        return setOption(option, notMerge);
      };
      window.addEventListener("resize", () => charts[id].resize());
    }
    return charts[id];
  }

  const pct = (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%");
  const num = (x) => (x === null || x === undefined ? "—" : Number(x).toLocaleString("en-US"));
  const rate = (x) => Number(x).toFixed(1);

  function asOf(ms) {
    const t = $("as-of");
    if (!t || !ms) return;
    const d = new Date(ms);
    t.dateTime = d.toISOString();
    t.textContent = d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function showError(data) {
    let p = $("error");
    if (!p) {
      p = el("p", null, { id: "error", class: "error", role: "alert" });
      document.querySelector("main").insertBefore(p, document.querySelector("main").children[1] || null);
    }
    p.textContent = data.error || "";
    p.hidden = !data.error;
  }

  // ---- pages ---------------------------------------------------------------------------------------------
  const overviewSeries = { t: [], valid: [], invalid: [] };

  const render = {
    overview(d) {
      $("valid-rate").textContent = rate(d.validPerSecond);
      $("invalid-rate").textContent = rate(d.invalidPerSecond);
      $("seen").textContent = num(d.validSeen) + " / " + num(d.invalidSeen);
      $("ingest-lag").textContent = num(d.ingestLag);
      $("sink").textContent = d.clickhouse === "ok" ? "ok, " + num(d.sinkLag) + " behind" : d.clickhouse;
      $("kafka").textContent = d.kafka;
      fill($("rows"), Object.entries(d.lag).map(([t, n]) => row([t, num(n)])));
      const s = overviewSeries;
      if (!d.asOf) return;
      s.t.push(new Date(d.asOf * 1000).toISOString().slice(11, 19));
      s.valid.push(d.validPerSecond);
      s.invalid.push(d.invalidPerSecond);
      for (const k of ["t", "valid", "invalid"]) if (s[k].length > 300) s[k].shift();
      chart("chart").setOption({
        animation: false, tooltip: { trigger: "axis" }, legend: {}, xAxis: { type: "category", data: s.t },
        yAxis: { type: "value", name: "events/s" },
        series: [{ name: "valid", type: "line", data: s.valid, showSymbol: false },
                 { name: "invalid", type: "line", data: s.invalid, showSymbol: false }],
      });
    },

    funnels(d) {
      $("range").textContent = d.from + " … " + d.to + " (UTC)";
      const root = $("funnels");
      const keep = new Set();
      for (const f of d.funnels) {
        const id = "funnel-" + f.name;
        keep.add(id);
        let box = $(id);
        if (!box) {
          box = el("section", null, { id: id, class: "funnel" });
          box.appendChild(el("h2", f.name));
          box.appendChild(el("div", null, { id: id + "-chart", class: "chart" }));
          const table = el("table");
          const head = el("tr");
          for (const h of ["step", "event", "persons", "conversion", "from previous"]) head.appendChild(el("th", h));
          table.appendChild(el("thead")).appendChild(head);
          table.appendChild(el("tbody", null, { id: id + "-rows" }));
          box.appendChild(table);
          root.appendChild(box);
        }
        fill($(id + "-rows"), f.steps.map((s) => row([s.step, s.event, num(s.persons), pct(s.conversion),
                                                        pct(s.step_conversion)], { "data-step": s.step })));
        chart(id + "-chart").setOption({
          animation: false, tooltip: {},
          xAxis: { type: "category", data: f.steps.map((s) => s.step + ". " + s.event) },
          yAxis: { type: "value", name: "persons" },
          series: [{ type: "bar", data: f.steps.map((s) => s.persons),
                     label: { show: true, position: "top", formatter: (p) => pct(f.steps[p.dataIndex].conversion) } }],
        });
      }
      for (const child of [...root.children]) if (!keep.has(child.id)) child.remove();
    },

    retention(d) {
      const root = $("retention");
      for (const r of d.retention) {
        const id = "retention-" + r.name;
        let box = $(id);
        if (!box) {
          box = el("section", null, { id: id });
          box.appendChild(el("h2", r.name + " (per " + r.period + ")"));
          box.appendChild(el("div", null, { id: id + "-chart", class: "chart tall" }));
          const table = el("table");
          table.appendChild(el("thead"));
          table.appendChild(el("tbody", null, { id: id + "-rows" }));
          box.appendChild(table);
          root.appendChild(box);
        }
        const head = el("tr");
        head.appendChild(el("th", "cohort"));
        head.appendChild(el("th", "size"));
        for (let n = 1; n <= r.horizon; n++) head.appendChild(el("th", r.period + " " + n));
        box.querySelector("thead").replaceChildren(head);
        fill($(id + "-rows"), r.cohorts.map((c) => row([c.cohort, num(c.size), ...c.returned.map(num)],
                                                        { "data-cohort": c.cohort })));
        const cells = [];
        r.cohorts.forEach((c, y) => c.returned.forEach((n, x) => cells.push([x, y, c.size ? +(100 * n / c.size).toFixed(1) : 0])));
        chart(id + "-chart").setOption({
          animation: false, tooltip: { formatter: (p) => p.value[2] + "%" },
          xAxis: { type: "category", data: Array.from({ length: r.horizon }, (_, i) => r.period + " " + (i + 1)) },
          yAxis: { type: "category", data: r.cohorts.map((c) => c.cohort), inverse: true },
          visualMap: { min: 0, max: 100, calculable: true, orient: "horizontal", left: "center", bottom: 0 },
          series: [{ type: "heatmap", data: cells, label: { show: true, formatter: (p) => p.value[2] + "%" } }],
        });
      }
    },

    active(d) {
      fill($("rows"), d.days.slice().reverse().map((x) => row([x.day, num(x.dau), num(x.wau), num(x.mau),
                                                               pct(x.stickiness)], { "data-day": x.day })));
      const days = d.days.map((x) => x.day);
      chart("chart").setOption({
        animation: false, tooltip: { trigger: "axis" }, legend: {}, xAxis: { type: "category", data: days },
        yAxis: { type: "value", name: "persons" },
        series: ["dau", "wau", "mau"].map((k) => ({ name: k.toUpperCase(), type: "line", data: d.days.map((x) => x[k]) })),
      });
      chart("stickiness").setOption({
        animation: false, tooltip: { trigger: "axis" }, xAxis: { type: "category", data: days },
        yAxis: { type: "value", name: "DAU/MAU", max: 1 },
        series: [{ name: "stickiness", type: "line", data: d.days.map((x) => x.stickiness) }],
      });
    },

    experiments(d) {
      const root = $("experiments");
      root.replaceChildren();
      const interval = (e) => (e ? pct(e.point) + " [" + pct(e.lower) + ", " + pct(e.upper) + "]" : "—");
      for (const e of d.experiments) {
        const box = el("section", null, { id: "experiment-" + e.experiment });
        box.appendChild(el("h2", e.experiment + " (version " + e.version + ")"));
        const srm = e.srm;
        box.appendChild(el("p", srm.flagged
          ? "Sample ratio mismatch (p = " + srm.p_value.toPrecision(3) + "): check the assignment and the exposure logging; every result below is suspect."
          : "Sample ratio ok (p = " + srm.p_value.toPrecision(3) + ")", { class: srm.flagged ? "error srm" : "srm" }));
        const units = Object.entries(e.units).map(([v, n]) => v + " " + num(n)).join(", ");
        box.appendChild(el("p", "Exposed: " + units + "; " + num(e.excluded) + " excluded (more than one variation)."));
        const table = el("table");
        const head = el("tr");
        for (const h of ["metric", "variation", "n", "mean", "relative lift [95%]", "anytime-valid [95%]", "p", "chance to win", "status"]) {
          head.appendChild(el("th", h));
        }
        table.appendChild(el("thead")).appendChild(head);
        const body = el("tbody");
        for (const m of e.metrics) {
          body.appendChild(row([m.metric + (m.guardrail ? " (guardrail)" : ""), e.control + " (control)", num(m.control.n),
                                Number(m.control.mean).toPrecision(4), "", "", "", "", ""],
                               { "data-metric": m.metric, "data-variation": e.control }));
          for (const [name, r] of Object.entries(m.variations)) {
            const ok = r.status === "ok";
            body.appendChild(row([m.metric, name, num(r.n), Number(r.mean).toPrecision(4),
                                  ok ? interval(r.relative) : "—", ok ? interval(r.sequential) : "—",
                                  ok ? r.relative.p_value.toFixed(4) : "—", ok ? pct(r.chance_to_win) : "—",
                                  ok ? (r.guardrail_violated ? "GUARDRAIL VIOLATED" : "ok") : r.status],
                                 { "data-metric": m.metric, "data-variation": name }));
          }
        }
        table.appendChild(body);
        box.appendChild(table);
        root.appendChild(box);
      }
    },

    segments(d) {
      const sizes = d.sizes || [], members = d.members || [];
      fill($("sizes"), sizes.slice().reverse().map((r) => row([r[0], r[1], num(r[2]), num(r[3]), num(r[4])])));
      fill($("members"), members.map((r) => row(r)));
      const names = [...new Set(sizes.map((r) => r[0]))];
      const days = [...new Set(sizes.map((r) => r[1]))].sort();
      chart("chart").setOption({
        animation: false, tooltip: { trigger: "axis" }, legend: {}, xAxis: { type: "category", data: days },
        yAxis: { type: "value", name: "members" },
        series: names.map((n) => {
          const by = new Map(sizes.filter((r) => r[0] === n).map((r) => [r[1], r[2]]));
          return { name: n, type: "line", data: days.map((x) => by.get(x) ?? null) };
        }),
      }, true);
    },

    alerts(d) {
      const events = d.events || [];
      fill($("rows"), events.map((r) => row([r[3], r[0], r[1], r[2], r[4] === null ? "—" : Number(r[4]).toPrecision(4), r[6], r[5]],
                                            { class: r[1] })));
      const names = [...new Set(events.map((r) => r[0]))];
      chart("chart").setOption({
        animation: false, tooltip: { formatter: (p) => p.value[1] + ": " + p.value[2] + " at " + p.value[0] },
        xAxis: { type: "time", min: Date.now() - 7 * 86400000, max: Date.now() },  // the 7 days the page shows
        yAxis: { type: "category", data: names },
        series: [{ type: "scatter", symbolSize: 12,
                   data: events.map((r) => ({ value: [r[3].replace(" ", "T") + "Z", r[0], r[1]],
                                              itemStyle: { color: r[1] === "firing" ? "#c0392b" : "#27ae60" } })) }],
      }, true);
    },

    quality(d) {
      const series = d.hours || [];
      fill($("rows"), (d.reasons || []).map((r) => row([r[0], r[1], num(r[2])])));
      const hours = [...new Set(series.map((r) => r[0]))].sort();
      const sources = [...new Set(series.map((r) => r[1]))].sort();
      chart("chart").setOption({
        animation: false, tooltip: { trigger: "axis" }, legend: {}, xAxis: { type: "category", data: hours },
        yAxis: { type: "value", name: "rejected events" },
        series: sources.map((s) => {
          const by = new Map(series.filter((r) => r[1] === s).map((r) => [r[0], Number(r[2])]));
          return { name: s, type: "bar", stack: "all", data: hours.map((h) => by.get(h) || 0) };
        }),
      }, true);
    },

    events(d) {
      fill($("rows"), d.events.map((e) => {
        const at = e.at ? new Date(e.at).toISOString().replace("T", " ").slice(0, 23) : "";
        const detail = e.valid ? JSON.stringify(e.properties) : e.reasons.join("; ");
        return row([at, e.valid ? e.type : "invalid", e.event, e.person, e.source, detail],
                   { class: e.valid ? "valid" : "invalid" });
      }));
    },
  };

  // ---- the stream ---------------------------------------------------------------------------------------
  // One EventSource while the tab is visible (a hidden tab gives its connection back: browsers allow few per
  // host); the server pushes the page's data when it changes and a heartbeat saying how current it is.
  const params = new URLSearchParams(window.location.search);
  const url = "/ui/stream/" + page + (params.toString() ? "?" + params.toString() : "");
  // a metric page without its ClickHouse snapshot yet has only the error; the others keep their last data
  const needsSnapshot = ["funnels", "retention", "active", "experiments"].includes(page);
  let source = null;

  function open() {
    if (source) return;
    source = new EventSource(url);
    source.onopen = () => { $("state").textContent = "live"; };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {  // refused (logged out, session expired): log in again
        window.location.assign("/ui/login");
      } else {
        $("state").textContent = "reconnecting…";
      }
    };
    source.onmessage = (msg) => {
      const data = JSON.parse(msg.data);
      showError(data);
      if (!(data.error && needsSnapshot)) render[page](data);
      asOf(data.asOf * 1000);
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    };
    source.addEventListener("alive", (msg) => {
      const news = JSON.parse(msg.data);
      $("state").textContent = news.error ? "stale: " + news.error : "live";
      if (news.asOf) asOf(news.asOf * 1000);
    });
  }

  function close() {
    if (source) source.close();
    source = null;
    $("state").textContent = "paused (tab hidden)";
  }

  document.addEventListener("visibilitychange", () => (document.hidden ? close() : open()));
  if (!document.hidden) open();

  const replayed = params.get("replayed");
  if (page === "quality" && replayed !== null) {
    const p = el("p", replayed + " rejected events of the last " + (params.get("hours") || "?") +
                  " hours were sent back through the pipeline.", { id: "replayed", role: "status" });
    document.querySelector("main").insertBefore(p, document.querySelector("main h1").nextSibling);
  }
})();
