import Foundation

/// A child process (usually the `granary` command) whose standard output is read line by line.
public final class ChildProcess: @unchecked Sendable {
    // Only the test thread that created it touches it.
    public let process: Process
    private let output: FileHandle
    private var buffered = Data()
    public private(set) var transcript: [String] = []

    /// The `granary` executable built beside the test bundle.
    public static func granaryExecutable() throws -> URL {
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
        output = pipe.fileHandleForReading
        try process.run()
    }

    /// The next line of output, waiting at most `timeout` seconds.
    public func readLine(timeout: Double = 30) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let newline = buffered.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffered[buffered.startIndex..<newline], as: UTF8.self)
                buffered.removeSubrange(buffered.startIndex...newline)
                transcript.append(line)
                return line
            }
            guard Date() < deadline else { throw ChildProcessError("no output line within \(timeout) s; so far: \(transcript)") }
            var poller = pollfd(fd: output.fileDescriptor, events: Int16(POLLIN), revents: 0)
            if poll(&poller, 1, 100) > 0 {
                let chunk = output.availableData
                if chunk.isEmpty {
                    throw ChildProcessError("the child exited (status \(process.isRunning ? -1 : process.terminationStatus)) before printing a line; so far: \(transcript)")
                }
                buffered.append(chunk)
            }
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
        while true {
            var poller = pollfd(fd: output.fileDescriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 0) > 0 else { break }
            let chunk = output.availableData
            if chunk.isEmpty { break }
            buffered.append(chunk)
        }
        return takeBufferedLines()
    }

    /// Every line the child printed that was not read yet, up to the end of its output (call
    /// after it ended). A last line without its newline is not returned: it was cut off.
    public func remainingLines() -> [String] {
        buffered.append(output.readDataToEndOfFile())
        return takeBufferedLines()
    }

    /// The complete lines in the buffer, taken out of it and added to the transcript.
    private func takeBufferedLines() -> [String] {
        var lines: [String] = []
        while let newline = buffered.firstIndex(of: UInt8(ascii: "\n")) {
            let line = String(decoding: buffered[buffered.startIndex..<newline], as: UTF8.self)
            buffered.removeSubrange(buffered.startIndex...newline)
            transcript.append(line)
            lines.append(line)
        }
        return lines
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
