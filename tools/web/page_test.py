#!/usr/bin/env python3
"""The page test: headless Chromium, driven over WebDriver (chromedriver), loads web/ from a
local static server and segments the example scene: whole twice (the second time with its
graph built), then in the slide and ms-flip modes. Each class map must reach a pixel
accuracy of at least 0.9 against assets/scene_labels.png, as the native CLI test holds the
bundled model. Then a second browser without WebGPU must show the page's clear message.
Standard library only.

    tools/web/page_test.py [--screenshot docs/web_page.png]

Needs web/pkg from tools/web/build.sh, and Debian's chromium and chromium-driver."""

import argparse, base64, functools, http.server, json, os, socket, struct, subprocess
import sys, threading, time, urllib.request, zlib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MIN_ACCURACY = 0.9


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".js": "text/javascript"}

    def log_message(self, *args):
        pass


def serve(directory):
    handler = functools.partial(Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Browser:
    """A WebDriver session of headless Chromium."""

    def __init__(self, driver, webgpu):
        args = json.load(open(os.path.join(ROOT, "tools/web/webdriver.json")))["goog:chromeOptions"]["args"]
        if not webgpu:
            args = [a for a in args if a != "--enable-unsafe-webgpu"] + ["--disable-features=WebGPU"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": args + ["--window-size=1100,1000"]}}}}
        self.driver = driver
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        url = self.driver + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from None

    def run(self, script, *args):
        return self.call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def open(self, url):
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def wait_state(self, states, timeout):
        end = time.time() + timeout
        while time.time() < end:
            state = self.run("return window.hrnet ? window.hrnet.state : 'no page state';")
            if state in states:
                return state
            time.sleep(0.2)
        raise RuntimeError(f"the page stayed {state!r} for {timeout} s (waiting for {states})")

    def screenshot(self, path):
        png = base64.b64decode(self.call("GET", f"/session/{self.session}/screenshot"))
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(png)
        os.replace(tmp, path)

    def close(self):
        self.call("DELETE", f"/session/{self.session}")


def gray_png(path):
    """The values of an 8-bit grayscale, non-interlaced PNG (the label maps)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    at, idat, header = 8, b"", None
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        chunk = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        at += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert (depth, colour, interlace) == (8, 0, 0), f"{path}: not 8-bit grayscale, non-interlaced"
    raw, rows, prev = zlib.decompress(idat), [], bytearray(width)
    for y in range(height):
        kind, line = raw[y * (width + 1)], bytearray(raw[y * (width + 1) + 1:(y + 1) * (width + 1)])
        for x in range(width):
            a = line[x - 1] if x else 0
            b, c = prev[x], prev[x - 1] if x else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, [v for row in rows for v in row]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshot", help="where to save a screenshot of the segmented page")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(ROOT, "web/pkg/hrnet_ocr_web_bg.wasm")):
        sys.exit("web/pkg is missing: run tools/web/build.sh first")
    server = serve(os.path.join(ROOT, "web"))
    page = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    port = free_port()
    driver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    failures = []
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        browser = Browser(f"http://127.0.0.1:{port}", webgpu=True)
        try:
            browser.open(page)
            state = browser.wait_state({"ready", "error"}, 120)
            if state == "error":
                raise RuntimeError("the page failed to start: " + browser.run("return window.hrnet.error;"))
            adapter = browser.run("return document.getElementById('adapter').textContent;")
            # Whole twice (the second with its graph built), then the window modes.
            results = []
            for mode in ["whole", "whole", "slide", "ms-flip"]:
                browser.run("window.hrnet.segmentExample(arguments[0]);", mode)
                if browser.wait_state({"done", "error"}, 600) == "error":
                    raise RuntimeError(f"segmenting ({mode}) failed: " + browser.run("return window.hrnet.error;"))
                results.append(browser.run("return window.hrnet.result;"))
                browser.run("window.hrnet.state = 'ready';")
            width, height, truth = gray_png(os.path.join(ROOT, "assets/scene_labels.png"))
            print(f"page: the {width}x{height} example on {adapter}")
            for i, result in enumerate(results):
                assert (result["width"], result["height"]) == (width, height), "the page segmented another size"
                accuracy = sum(p == t for p, t in zip(result["classes"], truth)) / len(truth)
                built = " (graph built)" if i != 1 else ""
                print(f"page: {result['mode']:>7}: pixel accuracy {accuracy:.4f}, {result['ms']:.0f} ms{built}")
                if accuracy < MIN_ACCURACY:
                    failures.append(f"{result['mode']}: pixel accuracy {accuracy:.4f} < {MIN_ACCURACY}")
            # The screenshot shows the whole image's overlay, its graph built.
            browser.run("window.hrnet.segmentExample('whole');")
            browser.wait_state({"done", "error"}, 600)
            if args.screenshot:
                browser.screenshot(os.path.join(ROOT, args.screenshot) if not os.path.isabs(args.screenshot)
                                   else args.screenshot)
                print(f"page: screenshot in {args.screenshot}")
        finally:
            browser.close()
        plain = Browser(f"http://127.0.0.1:{port}", webgpu=False)
        try:
            plain.open(page)
            if plain.wait_state({"ready", "error"}, 60) != "error":
                failures.append("without WebGPU the page did not report an error")
            else:
                message = plain.run("return document.getElementById('status').textContent;")
                print(f"page without WebGPU says: {message}")
                if "WebGPU" not in message:
                    failures.append(f"the no-WebGPU message does not say what is missing: {message!r}")
        finally:
            plain.close()
    finally:
        driver.terminate()
        server.shutdown()
    for f in failures:
        print(f"page: FAILED: {f}")
    checks = 5
    print(f"{checks - len(failures)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
