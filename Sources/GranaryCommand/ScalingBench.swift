import Foundation
import Granary
import GranaryWorkloads

/// One point of a scaling run: a worker count and what it committed.
struct ScalingPoint: Codable {
    var workers: Int
    var committedPerSecond: Double
    var latencyNanoseconds: [String: UInt64]
    var abortRate: Double
    var phaseMeanNanoseconds: [String: Double]
    /// Core-to-core handoff measured right after this point's run (placement changes on a VM).
    var coreToCoreNanoseconds: Double
}

struct ScalingDocument: Codable {
    var workload: String
    var run: RunFacts
    var nodes: Int
    var replicas: Int
    var secondsPerPoint: Double
    var cores: Int
    var points: [ScalingPoint]
    var invariantViolations: [String]
}

/// `granary bench WORKLOAD --scaling`: the workload loaded once, then run with 1, 2, 4, ... workers
/// (every worker kept: no adaptive count), a table of committed/s per worker count, its speed-up
/// over one worker and the efficiency (speed-up / workers), and the invariant checked at the end.
func runScaling(_ name: String, _ workload: some Workload, on cluster: Cluster, _ options: BenchOptions,
                parameters: [String: String], startTime: Date) async throws {
    var points: [ScalingPoint] = []
    var committedDelta: Int64 = 0
    var inDoubt: [Int64] = []
    for count in options.scalingCounts {
        let report = Runner.run(workload, on: cluster, workers: count, adaptive: false, seconds: options.seconds,
                                seed: options.seed &+ UInt64(count)) { line in
            if !options.quiet { FileHandle.standardError.write(("\r\(count) workers: " + line).data(using: .utf8)!) }
        }
        if !options.quiet { FileHandle.standardError.write("\n".data(using: .utf8)!) }
        committedDelta &+= report.committedDelta
        inDoubt += report.inDoubtDeltas
        points.append(ScalingPoint(workers: count, committedPerSecond: report.committedPerSecond,
                                   latencyNanoseconds: report.latencyNanoseconds, abortRate: report.abortRate,
                                   phaseMeanNanoseconds: report.phaseMeanNanoseconds,
                                   coreToCoreNanoseconds: CoreToCoreProbe.measure()))
    }
    try await cluster.quiesce()
    let violations = try await workload.check(cluster, committedDelta: committedDelta, inDoubt: inDoubt)
    let cores = ProcessInfo.processInfo.activeProcessorCount
    print(ScalingTable.render(name: name, points: points, options: options, cores: cores))
    if let json = options.json {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let document = ScalingDocument(workload: name, run: RunFacts(options: options, workloadParameters: parameters, startTime: startTime), nodes: options.nodes, replicas: options.replicas, secondsPerPoint: options.seconds,
                                       cores: cores, points: points, invariantViolations: violations)
        try encoder.encode(document).write(to: URL(fileURLWithPath: json))
        print("wrote \(json)")
    }
    if let plot = options.plot {
        try ScalingTable.svg(title: "Granary \(name) scaling: \(options.nodes) nodes, \(options.replicas) replicas, \(cores) cores", points: points)
            .write(toFile: plot, atomically: true, encoding: .utf8)
        print("wrote \(plot)")
    }
    try await cluster.shutdown()
    if !violations.isEmpty {
        throw CommandFailure("the \(name) invariant does not hold after the scaling run: \(violations.joined(separator: "; "))")
    }
    print("invariant: holds")
}

enum ScalingTable {
    static func render(name: String, points: [ScalingPoint], options: BenchOptions, cores: Int) -> String {
        var lines = ["\(name) scaling: \(options.nodes) nodes, \(options.replicas) replicas, \(options.transport), \(String(format: "%.1f", options.seconds)) s per worker count, \(cores) cores",
                     "  workers  committed/s   speed-up  efficiency  p50 us  p99 us  abort rate  lock us  handoff ns"]
        let one = points.first { $0.workers == 1 }?.committedPerSecond
        for point in points {
            let speedUp = one.map { point.committedPerSecond / max($0, 1) }
            func right(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.count)) + text }
            lines.append("  " + right("\(point.workers)", 7) + "  " + right(String(format: "%.0f", point.committedPerSecond), 11)
                         + "  " + right(speedUp.map { String(format: "%.2fx", $0) } ?? "-", 8)
                         + "  " + right(speedUp.map { String(format: "%.0f%%", 100 * $0 / Double(point.workers)) } ?? "-", 10)
                         + String(format: "  %6.1f  %6.1f  %9.2f%%  %7.1f  %10.0f",
                                  Double(point.latencyNanoseconds["p50"] ?? 0) / 1000, Double(point.latencyNanoseconds["p99"] ?? 0) / 1000,
                                  point.abortRate * 100, (point.phaseMeanNanoseconds["lock"] ?? 0) / 1000, point.coreToCoreNanoseconds))
        }
        return lines.joined(separator: "\n")
    }

    /// Committed/s against workers (log2 axis), with the ideal line (one worker's rate times the count).
    static func svg(title: String, points: [ScalingPoint]) -> String {
        let width = 640.0, height = 420.0, left = 90.0, top = 50.0, plotWidth = 500.0, plotHeight = 290.0
        let counts = points.map { Double($0.workers) }
        let maxCount = max(2, counts.max() ?? 2)
        let one = points.first { $0.workers == 1 }?.committedPerSecond ?? 0
        let maxRate = max(1, points.map(\.committedPerSecond).max() ?? 1, one * maxCount) * 1.05
        func x(_ workers: Double) -> Double { left + log2(workers) / log2(maxCount) * plotWidth }
        func y(_ rate: Double) -> Double { top + plotHeight - rate / maxRate * plotHeight }
        var out = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(width / 2)" y="22" text-anchor="middle" font-size="15" font-weight="bold">\(title.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;"))</text>
        <line x1="\(left)" y1="\(top + plotHeight)" x2="\(left + plotWidth)" y2="\(top + plotHeight)" stroke="black"/>
        <line x1="\(left)" y1="\(top)" x2="\(left)" y2="\(top + plotHeight)" stroke="black"/>
        <text x="\(left + plotWidth / 2)" y="\(top + plotHeight + 40)" text-anchor="middle">workers (log scale)</text>
        <text x="\(left - 70)" y="\(top + plotHeight / 2)" text-anchor="middle" transform="rotate(-90 \(left - 70) \(top + plotHeight / 2))">committed transactions / s</text>

        """
        if one > 0 {
            out += "<line x1=\"\(x(1))\" y1=\"\(y(one))\" x2=\"\(x(maxCount))\" y2=\"\(y(one * maxCount))\" stroke=\"#999\" stroke-dasharray=\"4 4\"/>\n"
            out += "<text x=\"\(x(maxCount) - 4)\" y=\"\(y(one * maxCount) - 6)\" text-anchor=\"end\" fill=\"#666\">ideal</text>\n"
        }
        let line = points.map { String(format: "%.1f,%.1f", x(Double($0.workers)), y($0.committedPerSecond)) }
        out += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"\(line.joined(separator: " "))\"/>\n"
        for point in points {
            out += String(format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#1f77b4\"/>\n", x(Double(point.workers)), y(point.committedPerSecond))
            out += "<text x=\"\(x(Double(point.workers)))\" y=\"\(top + plotHeight + 16)\" text-anchor=\"middle\">\(point.workers)</text>\n"
        }
        for tick in 0...4 {
            let value = maxRate * Double(tick) / 4
            out += "<text x=\"\(left - 5)\" y=\"\(y(value) + 4)\" text-anchor=\"end\">\(String(format: "%.2fM", value / 1e6))</text>\n"
        }
        return out + "</svg>\n"
    }
}
