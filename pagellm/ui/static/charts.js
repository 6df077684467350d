// A small time-series line chart on a <canvas>: several named series, a y axis with round
// ticks, a legend, the last value of each series. The canvas carries data-points (samples
// held), data-last (the last values) and data-max (each series' peak over the samples
// held), as JSON, so that tests and scripts can read what it shows.
"use strict";

class LineChart {
  constructor(canvas, options) {
    this.canvas = canvas;
    this.opts = Object.assign({ unit: "", maxPoints: 180, min: 0, max: null, digits: 1 }, options);
    this.times = [];
    this.series = new Map(); // name -> array aligned with this.times (null: no value)
  }

  static colors = ["#2f6fed", "#e8590c", "#2e7d32", "#9c27b0", "#c62828", "#00838f", "#6d4c41",
                   "#ad1457"];

  push(time, values) {
    this.times.push(time);
    for (const [name, arr] of this.series) arr.push(name in values ? values[name] : null);
    for (const [name, v] of Object.entries(values)) {
      if (!this.series.has(name)) {
        this.series.set(name, new Array(this.times.length - 1).fill(null).concat([v]));
      }
    }
    if (this.times.length > this.opts.maxPoints) {
      this.times.shift();
      for (const arr of this.series.values()) arr.shift();
    }
    this.canvas.dataset.points = String(this.times.length);
    this.canvas.dataset.last = JSON.stringify(values);
    const peaks = {};
    for (const [name, arr] of this.series) {
      const held = arr.filter((v) => v != null && isFinite(v));
      peaks[name] = held.length ? Math.max(...held) : null;
    }
    this.canvas.dataset.max = JSON.stringify(peaks);
    this.draw();
  }

  niceMax(v) {
    if (!(v > 0)) return this.opts.digits === 0 ? 4 : 1;
    if (this.opts.digits === 0 && v <= 4) return 4; // whole numbers: one per tick
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  format(v, digits) {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return v.toFixed(a >= 100 ? 0 : digits == null ? this.opts.digits : digits);
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 400;
    const h = c.clientHeight || 190;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const style = getComputedStyle(document.body);
    const text = style.getPropertyValue("--muted") || "#888";
    const grid = style.getPropertyValue("--border") || "#ddd";
    g.font = "11px system-ui, sans-serif";
    // The legend first: as many rows as its labels need.
    const legend = [];
    let lx = 46, rows = 1;
    let idx = 0;
    for (const [name, arr] of this.series) {
      let last = null;
      for (let i = arr.length - 1; i >= 0; i--) if (arr[i] != null) { last = arr[i]; break; }
      const label = name + " " + this.format(last) + this.opts.unit;
      const width = g.measureText(label).width + 26;
      if (lx + width > w && lx > 46) {
        lx = 46;
        rows++;
      }
      legend.push({ label, x: lx, row: rows - 1, color: LineChart.colors[idx++ % LineChart.colors.length] });
      lx += width;
    }
    const left = 46, right = 8, top = 10 + 13 * rows, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    let hi = this.opts.max;
    if (hi == null) {
      hi = 0;
      for (const arr of this.series.values()) for (const v of arr) if (v != null && v > hi) hi = v;
      hi = this.niceMax(hi);
    }
    const lo = this.opts.min;
    g.font = "11px system-ui, sans-serif";
    g.lineWidth = 1;
    const step = (hi - lo) / 4;
    const tickDigits = Number.isInteger(step) ? 0 : step >= 0.1 ? 1 : 2;
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      const y = top + ph - (ph * i) / 4;
      g.strokeStyle = grid;
      g.beginPath();
      g.moveTo(left, y);
      g.lineTo(left + pw, y);
      g.stroke();
      g.fillStyle = text;
      g.textAlign = "right";
      g.fillText(this.format(v, tickDigits) + this.opts.unit, left - 4, y + 4);
    }
    const n = this.times.length;
    const span = n > 1 ? this.times[n - 1] - this.times[0] : 1;
    const xOf = (t) => left + (n > 1 ? ((t - this.times[0]) / span) * pw : pw);
    const yOf = (v) => top + ph - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo || 1)) * ph;
    if (n > 1) {
      g.textAlign = "left";
      g.fillText("-" + Math.round(span / 1000) + " s", left, h - 4);
      g.textAlign = "right";
      g.fillText("now", left + pw, h - 4);
    }
    idx = 0;
    for (const [, arr] of this.series) {
      const color = LineChart.colors[idx++ % LineChart.colors.length];
      g.strokeStyle = color;
      g.lineWidth = 1.8;
      g.beginPath();
      let open = false;
      for (let i = 0; i < n; i++) {
        const v = arr[i];
        if (v == null || !isFinite(v)) {
          open = false;
          continue;
        }
        const x = xOf(this.times[i]), y = yOf(v);
        if (open) g.lineTo(x, y);
        else g.moveTo(x, y);
        open = true;
      }
      if (n === 1 && arr[0] != null) g.arc(xOf(this.times[0]), yOf(arr[0]), 2, 0, 2 * Math.PI);
      g.stroke();
    }
    g.textAlign = "left";
    for (const item of legend) {
      const y = 11 + 13 * item.row;
      g.fillStyle = item.color;
      g.fillRect(item.x, y - 5, 10, 3);
      g.fillStyle = text;
      g.fillText(item.label, item.x + 13, y);
    }
  }
}
