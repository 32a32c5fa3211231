import Foundation

/// A self-contained SVG with two panels: committed transactions per second over the run, and the
/// latency by percentile (HdrHistogram's axis: 90%, 99%, 99.9%, 99.99% equally spaced; latency on
/// a log axis). Opens in any browser.
package enum BenchPlot {
    package static func svg(title: String, report: RunReport, intervalSeconds: Double = 0.25) -> String {
        let width = 900.0, height = 380.0, panel = 400.0, top = 50.0, plotHeight = 260.0, left = 70.0
        var out = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(width / 2)" y="22" text-anchor="middle" font-size="15" font-weight="bold">\(escape(title))</text>

        """
        func axes(x0: Double, xLabel: String, yLabel: String) {
            out += "<line x1=\"\(x0)\" y1=\"\(top + plotHeight)\" x2=\"\(x0 + panel - 40)\" y2=\"\(top + plotHeight)\" stroke=\"black\"/>\n"
            out += "<line x1=\"\(x0)\" y1=\"\(top)\" x2=\"\(x0)\" y2=\"\(top + plotHeight)\" stroke=\"black\"/>\n"
            out += "<text x=\"\(x0 + (panel - 40) / 2)\" y=\"\(top + plotHeight + 40)\" text-anchor=\"middle\">\(escape(xLabel))</text>\n"
            out += "<text x=\"\(x0 - 55)\" y=\"\(top + plotHeight / 2)\" text-anchor=\"middle\" transform=\"rotate(-90 \(x0 - 55) \(top + plotHeight / 2))\">\(escape(yLabel))</text>\n"
        }
        // Panel 1: throughput over time.
        let timeline = report.timeline
        let maxRate = max(1, timeline.max() ?? 1) * 1.1
        axes(x0: left, xLabel: "time (s)", yLabel: "committed transactions / s")
        let duration = max(intervalSeconds, Double(timeline.count) * intervalSeconds)
        let points = timeline.enumerated().map { index, rate in
            let x = left + (Double(index + 1) * intervalSeconds / duration) * (panel - 40)
            let y = top + plotHeight - rate / maxRate * plotHeight
            return String(format: "%.1f,%.1f", x, y)
        }
        out += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"\(points.joined(separator: " "))\"/>\n"
        for tick in 0...4 {
            let value = maxRate * Double(tick) / 4
            let y = top + plotHeight - Double(tick) / 4 * plotHeight
            out += "<text x=\"\(left - 5)\" y=\"\(y + 4)\" text-anchor=\"end\">\(compact(value))</text>\n"
            let t = duration * Double(tick) / 4
            out += "<text x=\"\(left + Double(tick) / 4 * (panel - 40))\" y=\"\(top + plotHeight + 16)\" text-anchor=\"middle\">\(String(format: "%.1f", t))</text>\n"
        }
        // Panel 2: latency by percentile, as HdrHistogram plots it: the x axis is log10(1 / (1 - p)),
        // so 90%, 99%, 99.9% and 99.99% are equally spaced and the tail is as wide as the body;
        // latency on a log axis.
        let x0 = left + panel + 40
        axes(x0: x0, xLabel: "percentile", yLabel: "latency (us, log scale)")
        let tail = report.latencyCDF.filter { $0[0] > 0 && $0[1] < 0.99995 }
        if let low = tail.map({ $0[0] }).min(), let high = tail.map({ $0[0] }).max() {
            let lo = floor(log10(max(low / 1000, 0.1))), hi = max(lo + 1, ceil(log10(high / 1000)))
            let nines = 4.0
            let points = tail.map { point -> String in
                let x = x0 + min(nines, log10(1 / (1 - point[1]))) / nines * (panel - 40)
                let y = top + plotHeight - (log10(point[0] / 1000) - lo) / (hi - lo) * plotHeight
                return String(format: "%.1f,%.1f", x, y)
            }
            out += "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"\(points.joined(separator: " "))\"/>\n"
            for (index, label) in ["0%", "90%", "99%", "99.9%", "99.99%"].enumerated() {
                let x = x0 + Double(index) / nines * (panel - 40)
                out += "<text x=\"\(x)\" y=\"\(top + plotHeight + 16)\" text-anchor=\"middle\">\(label)</text>\n"
            }
            var decade = lo
            while decade <= hi {
                let y = top + plotHeight - (decade - lo) / (hi - lo) * plotHeight
                out += "<text x=\"\(x0 - 5)\" y=\"\(y + 4)\" text-anchor=\"end\">\(compact(pow(10, decade)))</text>\n"
                decade += 1
            }
        }
        out += "</svg>\n"
        return out
    }

    static func compact(_ value: Double) -> String {
        switch value {
        case 1_000_000...: return String(format: "%.1fM", value / 1_000_000)
        case 1_000...: return String(format: "%.0fk", value / 1_000)
        case 1...: return String(format: "%.0f", value)
        default: return String(format: "%.1f", value)
        }
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
