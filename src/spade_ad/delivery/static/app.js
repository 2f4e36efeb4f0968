/* spade-ad inspector: upload an image, see its heatmap and mask, move the threshold, explain a pixel.
   Plain JavaScript, no build step, nothing loaded from outside this server. */
(function () {
  'use strict';

  var $ = function (id) { return document.getElementById(id); };
  var info = null;      // GET /info
  var current = null;   // last POST /predict answer
  var map = null;       // Float32Array of current.map
  var seq = 0;          // ignore answers to superseded uploads
  var explainSeq = 0;

  function fmt(v, digits) {
    if (v === null || v === undefined || isNaN(v)) return '–';
    return Number(v).toPrecision(digits || 4);
  }

  function showMessage(text, kind) {
    var m = $('message');
    m.textContent = text;
    m.className = 'message ' + (kind || 'error');
    m.hidden = false;
  }

  function clearMessage() {
    var m = $('message');
    m.hidden = true;
    m.textContent = '';
  }

  function errorText(status, body) {
    var detail = body && body.detail;
    if (Array.isArray(detail)) {
      detail = detail.map(function (d) { return d.msg || JSON.stringify(d); }).join('; ');
    }
    if (!detail) detail = 'the server answered ' + status;
    return 'Error ' + status + ': ' + detail;
  }

  function readJson(resp) {
    return resp.text().then(function (t) {
      try { return JSON.parse(t); } catch (e) { return { detail: t ? t.slice(0, 300) : '' }; }
    });
  }

  // ------------------------------------------------------------------ which model (spade-ad serve MODELS_DIR)
  // A single model is served at the root; a folder of models at /models/<name>/, picked in the header.
  var here = location.pathname.match(/^(\/models\/[^\/]+)/);
  var base = here ? here[1] : '';
  function at(path) { return base + path; }  // a URL of the model shown (answers give them relative to it)

  fetch('/models').then(function (r) { return r.ok ? r.json() : null; }).then(function (d) {
    if (!d || !d.models) { loadInfo(); return; }
    var pick = $('model-pick');
    pick.textContent = '';
    d.models.forEach(function (m) {
      var o = document.createElement('option');
      o.value = m.name;
      o.disabled = !m.available;
      o.textContent = m.available ? m.name + ' (generation ' + m.generation + ', ' + m.images + ' images)' :
        m.name + ' (unavailable: ' + m.reason + ')';
      pick.appendChild(o);
    });
    var first = d.models.filter(function (m) { return m.available; })[0];
    var wanted = here ? decodeURIComponent(here[1].slice(8)) : (first && first.name);
    if (wanted) pick.value = wanted;
    $('model-picker').hidden = false;
    pick.addEventListener('change', function () { choose(pick.value); });
    if (wanted) choose(wanted); else showMessage('No model is available in this folder.', 'error');
  }).catch(function () { loadInfo(); });

  function choose(name) {
    base = '/models/' + encodeURIComponent(name);
    $('result').hidden = true;
    current = null;
    clearMessage();
    loadInfo();
  }

  // ------------------------------------------------------------------ model information
  function loadInfo() {
  $('colour-bar').src = at('/colour-bar.png');
  fetch(at('/info')).then(function (r) { return r.json(); }).then(function (d) {
    info = d;
    $('model-info').textContent = 'model: ' + d.backbone + ', ' + d.n_train + ' normal images, image threshold ' +
      fmt(d.image_threshold) + ', pixel threshold ' + fmt(d.pixel_threshold);
    $('limit').textContent = 'PNG, JPEG, BMP, TIFF or WebP, at most ' + (d.max_upload_bytes / 1048576).toFixed(1) + ' MB';
    $('scale-note').textContent = d.colour_scale;
    $('generation').textContent = d.generation;
    document.querySelectorAll('.updates').forEach(function (el) { el.hidden = !d.updates_allowed; });
    checkHealth();
  }).catch(function () {
    showMessage('Could not reach the server for the model information.', 'error');
  });
  }

  // ------------------------------------------------------------------ upload
  function upload(file, keepMessage) {
    if (!file) return;
    lastFile = file;
    if (info && file.size > info.max_upload_bytes) {
      showMessage('Error 413: ' + file.name + ' is too large (' + (file.size / 1048576).toFixed(1) +
        ' MB; the server accepts at most ' + (info.max_upload_bytes / 1048576).toFixed(1) + ' MB)', 'error');
      return;
    }
    var my = ++seq;
    $('busy').hidden = false;
    var form = new FormData();
    form.append('file', file, file.name);
    fetch(at('/predict'), { method: 'POST', body: form }).then(function (resp) {
      return readJson(resp).then(function (body) {
        if (my !== seq) return;
        if (!resp.ok) {
          showMessage(errorText(resp.status, body), 'error');
          return;
        }
        if (!keepMessage) clearMessage();
        render(body);
      });
    }).catch(function (err) {
      if (my !== seq) return;
      showMessage('Upload failed: ' + err.message + ' (is the file larger than the server accepts?)', 'error');
    }).then(function () {
      if (my === seq) $('busy').hidden = true;
    });
  }

  var drop = $('drop');
  ['dragenter', 'dragover'].forEach(function (ev) {
    drop.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.add('over'); });
  });
  ['dragleave', 'drop'].forEach(function (ev) {
    drop.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.remove('over'); });
  });
  drop.addEventListener('drop', function (e) {
    var files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) upload(files[0]);
  });
  drop.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); }
  });
  // a file dropped beside the zone must not make the browser leave the page
  window.addEventListener('dragover', function (e) { e.preventDefault(); });
  window.addEventListener('drop', function (e) { e.preventDefault(); });
  $('file').addEventListener('change', function () {
    var f = this.files && this.files[0];
    this.value = '';  // choosing the same file again fires change again
    upload(f);
  });

  // ------------------------------------------------------------------ updates (serve --allow-updates)
  var lastFile = null;
  function changeModel(method, url, body) {
    var token = $('token').value.trim();
    if (!token) { showMessage('Enter the update token first (printed by spade-ad serve).', 'error'); return; }
    var opts = { method: method, headers: { 'Authorization': 'Bearer ' + token } };
    if (body) { opts.headers['Content-Type'] = 'application/json'; opts.body = JSON.stringify(body); }
    $('busy').hidden = false;
    fetch(at(url), opts).then(function (resp) {
      return readJson(resp).then(function (d) {
        if (!resp.ok) { showMessage(errorText(resp.status, d), 'error'); return; }
        info.generation = d.generation;
        info.image_threshold = d.image_threshold;
        info.pixel_threshold = d.pixel_threshold;
        $('generation').textContent = d.generation;
        $('model-info').textContent = 'model: ' + info.backbone + ', ' + d.n_train + ' normal images, image threshold ' +
          fmt(d.image_threshold) + ', pixel threshold ' + fmt(d.pixel_threshold);
        var what = d.action === 'add' ? 'Added ' + d.added.join(', ') :
          d.action === 'calibrate' ? 'Kept as a known defect: ' + d.defects_added.join(', ') :
          'Removed ' + d.removed.join(', ');
        showMessage(what +
          ': model generation ' + d.generation + ', ' + d.n_train + ' normal images, image threshold ' +
          fmt(d.before && d.before.image_threshold) + ' → ' + fmt(d.image_threshold) + ', pixel threshold ' +
          fmt(d.before && d.before.pixel_threshold) + ' → ' + fmt(d.pixel_threshold) + '.', 'info');
        if (lastFile) upload(lastFile, true);  // score the image again with the new model
      });
    }).catch(function (err) {
      showMessage('Update failed: ' + err.message, 'error');
    }).then(function () { $('busy').hidden = true; });
  }
  $('mark-normal').addEventListener('click', function () {
    if (current) changeModel('POST', '/normals', { id: current.id });
  });
  $('mark-defect').addEventListener('click', function () {
    if (current) changeModel('POST', '/defects', { id: current.id });
  });

  // ------------------------------------------------------------------ result
  function decodeMap(m) {
    var bin = atob(m.data);
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var view = new DataView(bytes.buffer);
    var out = new Float32Array(m.width * m.height);
    for (var j = 0; j < out.length; j++) out[j] = view.getFloat32(j * 4, true);
    return out;
  }

  function render(res) {
    current = res;
    map = decodeMap(res.map);
    $('result').hidden = false;
    $('filename').textContent = res.filename + ' (' + res.width + '×' + res.height + ')';
    $('score').textContent = fmt(res.score);
    $('norm-score').textContent = fmt(res.normalised_score, 3);
    $('image-thr').textContent = fmt(res.image_threshold);
    var v = $('verdict');
    v.textContent = res.verdict || 'no threshold';
    v.className = res.verdict || '';
    $('explain').hidden = true;
    $('marker').hidden = true;
    showRegions(res);
    checkHealth();
    var shade = $('zone-shade');  // the inspection zone: what lies outside it is shaded (and scores 0)
    shade.hidden = !res.zone;
    if (res.zone) shade.src = res.zone; else shade.removeAttribute('src');
    var img = $('overlay');
    img.onload = function () { sizeCanvases(); drawMask(); };
    img.src = res.overlay;
    var nb = $('neighbours');
    nb.textContent = '';
    res.neighbours.forEach(function (n) {
      var fig = document.createElement('figure');
      var im = document.createElement('img');
      var cap = document.createElement('figcaption');
      // the URL names the model generation and the image: after a change of the model the server refuses
      // it (409) rather than send another image; say so instead of showing a blank picture
      im.onerror = function () {
        fig.classList.add('missing');
        im.alt = 'thumbnail unavailable: the model changed since this image was scored; upload it again';
        im.title = im.alt;
      };
      im.src = at(n.thumbnail_url);
      im.alt = 'normal image ' + n.index;
      cap.textContent = n.name.split(/[\\/]/).pop();
      cap.title = n.name;
      fig.appendChild(im);
      fig.appendChild(cap);
      if (info && info.updates_allowed) {
        var rm = document.createElement('button');
        rm.type = 'button';
        rm.className = 'remove-normal';
        rm.textContent = 'Remove from normals';
        rm.title = 'this training image shows a defect: remove it from the model';
        // name the image (its id; its index in models saved before ids) and the generation it was shown in:
        // the server refuses (409) once the model changed, instead of removing another image
        var ref = n.id !== null && n.id !== undefined ? n.id : String(n.index);
        var url = '/normals/' + encodeURIComponent(ref) + '?generation=' + encodeURIComponent(res.generation);
        rm.addEventListener('click', function () { changeModel('DELETE', url, null); });
        fig.appendChild(rm);
      }
      nb.appendChild(fig);
    });
    drawMask();
  }

  // the regions the server found at the model's pixel threshold (the slider redraws the mask only)
  function showRegions(res) {
    var boxes = $('region-boxes'), body = $('regions').querySelector('tbody');
    boxes.textContent = '';
    body.textContent = '';
    var list = res.regions || [];
    $('regions-note').textContent = res.regions === null ? '(no pixel threshold: no regions)' :
      list.length + ' at the pixel threshold ' + fmt(res.pixel_threshold) +
      (res.min_area > 1 ? ', at least ' + res.min_area + ' px each' : '') +
      (res.verdict_rule === 'regions' ? '; the verdict follows the regions' : '');
    list.forEach(function (r, i) {
      var b = r.box, div = document.createElement('div');
      div.className = 'region-box';
      div.style.left = (100 * b[0] / res.width) + '%';
      div.style.top = (100 * b[1] / res.height) + '%';
      div.style.width = (100 * b[2] / res.width) + '%';
      div.style.height = (100 * b[3] / res.height) + '%';
      div.title = 'region ' + (i + 1) + ': ' + r.area + ' px, peak ' + fmt(r.peak);
      var tag = document.createElement('span');
      tag.textContent = String(i + 1);
      div.appendChild(tag);
      boxes.appendChild(div);
      var tr = document.createElement('tr');
      [String(i + 1), b.join(', '), String(r.area), fmt(r.peak), fmt(r.peak_normalised, 3), fmt(r.mean)]
        .forEach(function (text) {
          var td = document.createElement('td');
          td.textContent = text;
          tr.appendChild(td);
        });
      body.appendChild(tr);
    });
  }

  // drift: warn when the recent uploads leave the model's expected band (GET /health)
  function checkHealth() {
    fetch(at('/health')).then(function (r) { return r.ok ? r.json() : null; }).then(function (h) {
      $('health').textContent = h ? 'health: ' + h.status + ' (' + h.images + ' recent image' +
        (h.images === 1 ? '' : 's') + ')' : '';
      $('health').title = h ? h.line : '';
      var box = $('drift');
      box.hidden = !h || h.status !== 'drift';
      if (h && h.status === 'drift') box.textContent = 'Drift: ' + h.line;
    }).catch(function () {});
  }

  function sizeCanvases() {
    var img = $('overlay');
    var w = img.clientWidth, h = img.clientHeight;
    var mask = $('mask');
    mask.style.width = w + 'px';
    mask.style.height = h + 'px';
  }

  function pixelThreshold() {
    var s = parseFloat($('threshold').value);
    var base = current && current.pixel_threshold;
    if (!base) {  // no calibrated threshold: the scale is relative to the map's maximum (as the heatmap)
      base = (current ? current.max_pixel_score : 1) / 2;
    }
    return { factor: s, value: s * base };
  }

  function drawMask() {
    if (!current || !map) return;
    var t = pixelThreshold();
    var w = current.map.width, h = current.map.height;
    var flagged = new Uint8Array(w * h);
    var n = 0;
    for (var i = 0; i < flagged.length; i++) {
      if (map[i] >= t.value) { flagged[i] = 1; n++; }
    }
    var mask = $('mask'), outline = $('outline');
    mask.width = outline.width = w;
    mask.height = outline.height = h;
    var mctx = mask.getContext('2d'), octx = outline.getContext('2d');
    var mImg = mctx.createImageData(w, h), oImg = octx.createImageData(w, h);
    for (var y = 0; y < h; y++) {
      for (var x = 0; x < w; x++) {
        var k = y * w + x, p = 4 * k;
        var on = flagged[k];
        mImg.data[p] = mImg.data[p + 1] = mImg.data[p + 2] = on ? 255 : 0;
        mImg.data[p + 3] = 255;
        if (on && (x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
                   !flagged[k - 1] || !flagged[k + 1] || !flagged[k - w] || !flagged[k + w])) {
          oImg.data[p] = 0; oImg.data[p + 1] = 255; oImg.data[p + 2] = 255; oImg.data[p + 3] = 255;
        }
      }
    }
    mctx.putImageData(mImg, 0, 0);
    octx.putImageData(oImg, 0, 0);
    mask.dataset.flagged = String(n);
    $('mask-info').textContent = (100 * n / flagged.length).toFixed(2) + '% of pixels at or over ' + fmt(t.value);
    $('threshold-value').textContent = t.factor.toFixed(2) + ' × calibrated = ' + fmt(t.value);
    sizeCanvases();
  }

  $('threshold').addEventListener('input', drawMask);
  $('reset-threshold').addEventListener('click', function () {
    $('threshold').value = '1';
    drawMask();
  });
  window.addEventListener('resize', sizeCanvases);

  // ------------------------------------------------------------------ explain a pixel
  $('overlay').addEventListener('click', function (e) {
    if (!current) return;
    var rect = this.getBoundingClientRect();
    var fx = Math.min(Math.max((e.clientX - rect.left) / rect.width, 0), 0.999999);
    var fy = Math.min(Math.max((e.clientY - rect.top) / rect.height, 0), 0.999999);
    var x = Math.floor(fx * current.width), y = Math.floor(fy * current.height);
    var marker = $('marker');
    marker.style.left = (100 * fx) + '%';
    marker.style.top = (100 * fy) + '%';
    marker.hidden = false;
    var my = ++explainSeq, id = current.id;
    fetch(at('/correspondence?id=') + encodeURIComponent(id) + '&y=' + y + '&x=' + x).then(function (resp) {
      return readJson(resp).then(function (body) {
        if (my !== explainSeq) return;
        if (!resp.ok) { showMessage(errorText(resp.status, body), 'error'); return; }
        clearMessage();
        showExplanation(body);
      });
    }).catch(function (err) {
      showMessage('Correspondence request failed: ' + err.message, 'error');
    });
  });

  function showExplanation(c) {
    $('explain').hidden = false;
    var thumb = $('neighbour-thumb');
    thumb.onerror = function () {
      showMessage('The matched normal image is not served any more: the model changed since this image was ' +
        'scored (generation ' + c.generation + '); upload it again.', 'error');
    };
    thumb.src = at(c.thumbnail_url);
    var size = 256, minSide = 12;  // the displayed thumbnail's side; keep the box visible
    var b = c.box_frac;
    var bw = Math.max(minSide, (b[3] - b[1]) * size), bh = Math.max(minSide, (b[2] - b[0]) * size);
    var box = $('match-box');
    box.style.left = (c.x_frac * size - bw / 2) + 'px';
    box.style.top = (c.y_frac * size - bh / 2) + 'px';
    box.style.width = bw + 'px';
    box.style.height = bh + 'px';
    var tileBox = $('tile-box'), t = c.tile_box_frac;  // a tiled model: the normal tile that holds the match
    tileBox.hidden = !t;
    if (t) {
      tileBox.style.left = (t[1] * size) + 'px';
      tileBox.style.top = (t[0] * size) + 'px';
      tileBox.style.width = ((t[3] - t[1]) * size) + 'px';
      tileBox.style.height = ((t[2] - t[0]) * size) + 'px';
      tileBox.title = 'tile ' + c.tile;
    }
    $('pixel-pos').textContent = '(y ' + c.y + ', x ' + c.x + ')';
    $('pixel-score').textContent = fmt(c.pixel_score) +
      (c.pixel_score_normalised !== null ? ', ' + fmt(c.pixel_score_normalised, 3) + ' × threshold' : '');
    $('neighbour-name').textContent = c.neighbour_name.split(/[\\/]/).pop() + ' (#' + c.neighbour + ')';
    $('neighbour-name').title = c.neighbour_name;
    $('match-distance').textContent = fmt(c.distance);
    $('match-level').textContent = String(c.level);
  }
})();
