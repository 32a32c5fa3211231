import Foundation
import Synchronization

/// A child process (usually the `granary` command) whose standard output is read line by line.
///
/// A thread of its own drains the output pipe as the child writes, so that a child printing more
/// than a pipe holds (64 KiB) while the test reads nothing never blocks in `write`: a node process
/// did, on a thread of its cooperative pool, and its configuration manager stopped (seen as the
/// rejoin test waiting for minutes for a registered node to be admitted).
public final class ChildProcess: @unchecked Sendable {
    // `process` is only used by the test thread that created it; everything the reader thread
    // shares is in `output`, under its lock.
    public let process: Process
    /// What the reader thread shares with the test: the output not read yet, whether it ended,
    /// and the lines read so far. (The thread holds this, not the ChildProcess, whose deinit
    /// kills the child.)
    private final class Output: Sendable {
        let state = Mutex<(buffered: Data, ended: Bool, transcript: [String])>((Data(), false, []))
    }
    private let output = Output()

    /// Every line read so far (by ``readLine(timeout:)``, ``availableLines()`` or ``remainingLines()``).
    public var transcript: [String] { output.state.withLock { $0.transcript } }

    /// The `granary` executable built beside the test bundle, or the one `GRANARY_EXECUTABLE`
    /// names (the soft-RoCE stage runs its node processes from the release build: an emulated
    /// guest runs it several times faster).
    public static func granaryExecutable() throws -> URL {
        if let named = ProcessInfo.processInfo.environment["GRANARY_EXECUTABLE"], !named.isEmpty {
            guard FileManager.default.isExecutableFile(atPath: named) else {
                throw ChildProcessError("GRANARY_EXECUTABLE names \(named), which is not an executable file")
            }
            return URL(fileURLWithPath: named)
        }
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<3 {
            let candidate = directory.appendingPathComponent("granary")
            if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
            directory.deleteLastPathComponent()
        }
        throw ChildProcessError("no granary executable beside \(CommandLine.arguments[0]); run `swift build` first")
    }

    public init(_ executable: URL, _ arguments: [String]) throws {
        process = Process()
        process.executableURL = executable
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        let reading = pipe.fileHandleForReading
        try process.run()
        let output = self.output
        Thread.detachNewThread {
            while true {
                let chunk = reading.availableData  // blocks until the child writes or closes
                if chunk.isEmpty {
                    output.state.withLock { $0.ended = true }
                    return
                }
                output.state.withLock { $0.buffered.append(chunk) }
            }
        }
    }

    /// The next complete line, taken out of the buffer (and added to the transcript); nil if none.
    private func takeLine() -> (line: String?, ended: Bool) {
        output.state.withLock { state in
            guard let newline = state.buffered.firstIndex(of: UInt8(ascii: "\n")) else { return (nil, state.ended) }
            let line = String(decoding: state.buffered[state.buffered.startIndex..<newline], as: UTF8.self)
            state.buffered.removeSubrange(state.buffered.startIndex...newline)
            state.transcript.append(line)
            return (line, state.ended)
        }
    }

    /// The next line of output, waiting at most `timeout` seconds.
    public func readLine(timeout: Double = 30) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let (line, ended) = takeLine()
            if let line { return line }
            if ended {
                throw ChildProcessError("the child exited (status \(process.isRunning ? -1 : process.terminationStatus)) before printing a line; so far: \(transcript)")
            }
            guard Date() < deadline else { throw ChildProcessError("no output line within \(timeout) s; so far: \(transcript)") }
            usleep(2_000)
        }
    }

    /// Reads lines until one satisfies `condition` (returned), skipping the others (they stay in
    /// the transcript).
    public func readLine(until condition: (String) -> Bool, timeout: Double = 30) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let line = try readLine(timeout: max(0.01, deadline.timeIntervalSinceNow))
            if condition(line) { return line }
        }
    }

    /// Every complete line the child has printed that was not read yet, without waiting for more.
    public func availableLines() -> [String] {
        var lines: [String] = []
        while let line = takeLine().line { lines.append(line) }
        return lines
    }

    /// Every line the child printed that was not read yet, up to the end of its output (call
    /// after it ended; waits up to 10 s for the output to close). A last line without its
    /// newline is not returned: it was cut off.
    public func remainingLines() -> [String] {
        let deadline = Date().addingTimeInterval(10)
        while !output.state.withLock({ $0.ended }), Date() < deadline { usleep(2_000) }
        return availableLines()
    }

    /// Waits for the process to end; returns its exit status.
    public func waitForExit() -> Int32 {
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Sends `signal` and waits for the process to end.
    public func kill(_ signal: Int32 = SIGKILL) {
        Foundation.kill(process.processIdentifier, signal)
        process.waitUntilExit()
    }

    deinit {
        if process.isRunning { kill() }
    }
}

public struct ChildProcessError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
